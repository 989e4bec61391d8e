"""token_divergence against a float64 brute force, its limits, its gradients, and low-precision inputs."""
import math

import pytest
import torch

from common.distill import token_divergence

V = 11


def logits_pair(seed=0, shape=(3, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, V, generator=g) * 2, torch.randn(*shape, V, generator=g) * 3


def brute(s, t, kind, beta=0.5, T=1.0):
    """The textbook formulas, one position at a time, in float64 Python arithmetic."""
    def softmax(z):
        z = [x / T for x in z]
        top = max(z)
        e = [math.exp(x - top) for x in z]
        return [x / sum(e) for x in e]

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    out = torch.empty(s.shape[:-1], dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in s.shape[:-1]]).tolist():
        q, p = softmax(s[tuple(idx)].double().tolist()), softmax(t[tuple(idx)].double().tolist())
        if kind == "fkl":
            out[tuple(idx)] = kl(p, q)
        elif kind == "rkl":
            out[tuple(idx)] = kl(q, p)
        else:
            m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
            out[tuple(idx)] = beta * kl(p, m) + (1 - beta) * kl(q, m)
    return out


@pytest.mark.parametrize("kind,beta,T", [("fkl", 0.5, 1.0), ("rkl", 0.5, 1.0), ("jsd", 0.5, 1.0),
                                         ("jsd", 0.1, 1.0), ("jsd", 0.9, 2.0), ("fkl", 0.5, 2.0), ("rkl", 0.5, 0.5)])
def test_each_kind_equals_the_brute_force_per_position(kind, beta, T):
    s, t = logits_pair()
    got = token_divergence(s, t, kind, beta=beta, temperature=T)
    assert got.shape == (3, 4) and got.dtype == torch.float32
    want = brute(s, t, kind, beta, T)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7)
    assert (got >= 0).all() and (want > 1e-3).all()


def test_zero_for_equal_distributions_and_the_sides_are_not_swapped():
    s, t = logits_pair(1)
    for kind in ("fkl", "rkl", "jsd"):
        assert token_divergence(t, t, kind).abs().max() < 1e-6
        assert token_divergence(t + 5.0, t, kind).abs().max() < 1e-5  # a shift of logits is the same distribution
    # forward KL is KL(teacher || student): swapping the arguments gives the reverse one
    assert torch.allclose(token_divergence(s, t, "fkl"), token_divergence(t, s, "rkl"))
    assert not torch.allclose(token_divergence(s, t, "fkl"), token_divergence(s, t, "rkl"), rtol=1e-2)


def test_jsd_limits_are_the_two_kls():
    # the limits need beta small next to every ratio q/p (and p/q): logits of moderate size
    s, t = (x / 3 for x in logits_pair(2))
    small, large = 1e-4, 1 - 1e-4
    # rtol 1e-2: at beta = 1e-4 the JSD is ~1e-5, computed in float32 from log-probabilities of size ~1
    fkl, rkl = token_divergence(s, t, "fkl"), token_divergence(s, t, "rkl")
    assert not torch.allclose(fkl, rkl, rtol=0.1)
    assert torch.allclose(token_divergence(s, t, "jsd", beta=small) / small, fkl, rtol=1e-2)
    assert torch.allclose(token_divergence(s, t, "jsd", beta=large) / (1 - large), rkl, rtol=1e-2)
    with pytest.raises(ValueError):
        token_divergence(s, t, "jsd", beta=1.0)


def naive(s, t, kind, beta=0.5):
    """The formulas with probabilities (not log space), float64, for autograd to differentiate."""
    q, p = torch.softmax(s, -1), torch.softmax(t, -1)
    if kind == "fkl":
        return (p * (p.log() - q.log())).sum(-1)
    if kind == "rkl":
        return (q * (q.log() - p.log())).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_gradients_equal_float64_autograd_of_the_naive_formula(kind):
    s, t = logits_pair(3)
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(9))  # a weighted sum, so every position counts
    s32 = s.clone().requires_grad_()
    (token_divergence(s32, t, kind, beta=0.3) * w).sum().backward()
    s64 = s.double().requires_grad_()
    (naive(s64, t.double(), kind, beta=0.3) * w.double()).sum().backward()
    assert torch.allclose(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    assert s64.grad.abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_give_the_float32_value(dtype):
    s, t = logits_pair(4)
    s, t = s.to(dtype), t.to(dtype)
    for kind in ("fkl", "rkl", "jsd"):
        got = token_divergence(s, t, kind)
        assert got.dtype == torch.float32
        assert torch.allclose(got, token_divergence(s.float(), t.float(), kind), rtol=1e-6, atol=1e-7)


def test_the_rest_bucket_kl_is_the_kl_of_the_merged_distributions():
    """07's rest-bucket KL: the teacher's top K tokens kept, every other token merged into one bucket on
    each side; brute force in float64 Python. It never exceeds the exact KL and equals it at K = V."""
    from conftest import load_lesson
    lab = load_lesson("07_methods.py")
    s, t = logits_pair(seed=3)
    log_q, log_p = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    exact = brute(s, t, "fkl")
    for K in (1, 4, V):
        lp, ids = log_p.topk(K, -1)
        got = lab.rest_bucket_kl(log_q, ids, lp)
        for idx in torch.cartesian_prod(torch.arange(3), torch.arange(4)).tolist():
            keep = ids[tuple(idx)].tolist()
            p, q = log_p[tuple(idx)].exp().tolist(), log_q[tuple(idx)].exp().tolist()
            P = [p[j] for j in keep] + [sum(p[j] for j in range(V) if j not in keep)]
            Q = [q[j] for j in keep] + [sum(q[j] for j in range(V) if j not in keep)]
            want = sum(a * math.log(a / b) for a, b in zip(P, Q) if a > 0)
            assert got[tuple(idx)].item() == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert (got <= exact + 1e-12).all()
    assert torch.allclose(got, exact, rtol=1e-9)


def test_distinct_2_counts_distinct_pairs_in_the_sampled_part():
    from conftest import load_lesson
    lab = load_lesson("07_methods.py")
    seqs = [torch.tensor([9, 9, 1, 2, 1, 2]), torch.tensor([9, 1, 2, 3])]
    # sampled parts [1, 2, 1, 2] (prompt 2) and [1, 2, 3] (prompt 1): pairs 12 21 12 | 12 23: 3 distinct of 5
    assert lab.distinct_2(seqs, [2, 1]) == pytest.approx(3 / 5)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd"])
def test_a_token_one_side_rules_out_adds_nothing_not_nan(kind):
    """A -inf logit (a token masked out, as top-k does) has probability 0: its term is 0 log 0 = 0
    by the usual convention, not 0 * inf = nan; the rest equals the brute force without it. (The
    zero is on the side each KL weights by: the teacher's for fkl, the student's for rkl.)"""
    s, t = logits_pair(seed=4, shape=(2, 1))
    if kind in ("fkl", "jsd"):
        t[0, 0, 3] = float("-inf")  # the teacher rules token 3 out at position 0
    if kind in ("rkl", "jsd"):
        s[1, 0, 5] = float("-inf")  # the student rules token 5 out at position 1
    got = token_divergence(s, t, kind, beta=0.3)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), brute(s, t, kind, beta=0.3), rtol=1e-5, atol=1e-6)
