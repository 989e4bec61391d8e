"""token_divergence against a float64 brute force, its limits, its gradients, and low-precision inputs."""
import math

import pytest
import torch

from common.distill import rest_bucket_kl, sampled_rkl, token_divergence

V = 11


def logits_pair(seed=0, shape=(3, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, V, generator=g) * 2, torch.randn(*shape, V, generator=g) * 3


def softmax_py(z, T=1.0):
    """softmax(z / T) in float64 Python arithmetic."""
    z = [x / T for x in z]
    e = [math.exp(x - max(z)) for x in z]
    return [x / sum(e) for x in e]


def kl_py(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def positions(s, t, T=1.0):
    """Each position's index and its (q, p): the student's and the teacher's softmax at T."""
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in s.shape[:-1]]).tolist():
        yield tuple(idx), softmax_py(s[tuple(idx)].double().tolist(), T), softmax_py(t[tuple(idx)].double().tolist(), T)


def brute(s, t, kind, beta=0.5, T=1.0):
    """The textbook formulas, one position at a time, in float64 Python arithmetic."""
    kl = kl_py
    out = torch.empty(s.shape[:-1], dtype=torch.float64)
    for idx, q, p in positions(s, t, T):
        if kind == "fkl":
            out[idx] = kl(p, q)
        elif kind == "rkl":
            out[idx] = kl(q, p)
        elif kind == "tvd":
            out[idx] = 0.5 * sum(abs(x - y) for x, y in zip(p, q))
        else:
            m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
            out[idx] = beta * kl(p, m) + (1 - beta) * kl(q, m)
    return out


@pytest.mark.parametrize("kind,beta,T", [("fkl", 0.5, 1.0), ("rkl", 0.5, 1.0), ("jsd", 0.5, 1.0),
                                         ("jsd", 0.1, 1.0), ("jsd", 0.9, 2.0), ("fkl", 0.5, 2.0), ("rkl", 0.5, 0.5),
                                         ("tvd", 0.5, 1.0), ("tvd", 0.5, 2.0)])
def test_each_kind_equals_the_brute_force_per_position(kind, beta, T):
    s, t = logits_pair()
    got = token_divergence(s, t, kind, beta=beta, temperature=T)
    assert got.shape == (3, 4) and got.dtype == torch.float32
    want = brute(s, t, kind, beta, T)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7)
    assert (got >= 0).all() and (want > 1e-3).all()
    if kind == "tvd":
        assert (got <= 1).all()


def test_tvd_is_one_for_disjoint_distributions_and_zero_for_equal_ones():
    s = torch.full((2, V), -1e4)
    t = s.clone()
    s[:, 0], t[:, 1] = 0.0, 0.0  # all of q on token 0, all of p on token 1
    assert torch.allclose(token_divergence(s, t, "tvd"), torch.ones(2))
    assert token_divergence(t, t, "tvd").abs().max() == 0


def test_zero_for_equal_distributions_and_the_sides_are_not_swapped():
    s, t = logits_pair(1)
    for kind in ("fkl", "rkl", "jsd", "tvd"):
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
    for kind in ("fkl", "rkl", "jsd", "tvd"):
        got = token_divergence(s, t, kind)
        assert got.dtype == torch.float32
        assert torch.allclose(got, token_divergence(s.float(), t.float(), kind), rtol=1e-6, atol=1e-7)


def test_the_rest_bucket_kl_is_the_kl_of_the_merged_distributions():
    """rest_bucket_kl: the teacher's top K tokens kept, every other token merged into one bucket on
    each side; brute force in float64 Python. It never exceeds the exact KL and equals it at K = V."""
    s, t = logits_pair(seed=3)
    log_q, log_p = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    exact = brute(s, t, "fkl")
    for K in (1, 4, V):
        lp, ids = log_p.topk(K, -1)
        got = rest_bucket_kl(s.double(), ids, lp)
        for idx in torch.cartesian_prod(torch.arange(3), torch.arange(4)).tolist():
            keep = ids[tuple(idx)].tolist()
            p, q = log_p[tuple(idx)].exp().tolist(), log_q[tuple(idx)].exp().tolist()
            P = [p[j] for j in keep] + [sum(p[j] for j in range(V) if j not in keep)]
            Q = [q[j] for j in keep] + [sum(q[j] for j in range(V) if j not in keep)]
            want = sum(a * math.log(a / b) for a, b in zip(P, Q) if a > 0)
            assert got[tuple(idx)].item() == pytest.approx(want, rel=1e-6, abs=1e-9)
        assert (got <= exact + 1e-6).all()
    assert torch.allclose(got.double(), exact, rtol=1e-6)


def test_the_rest_bucket_kl_has_the_float64_gradient():
    """Its gradient (what 04 --kd soft --soft-tail rest trains on) against float64 autograd of the
    K + 1 bucket formula written with probabilities."""
    s, t = logits_pair(seed=5)
    lp, ids = torch.log_softmax(t, -1).topk(3, -1)
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    s32 = s.clone().requires_grad_()
    (rest_bucket_kl(s32, ids, lp) * w).sum().backward()
    s64 = s.double().requires_grad_()
    q, p_k = torch.softmax(s64, -1), lp.double().exp()
    q_k = q.gather(-1, ids)
    P = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    Q = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    ((P * (P.log() - Q.log())).sum(-1) * w.double()).sum().backward()
    assert torch.allclose(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    assert s64.grad.abs().max() > 1e-2


def test_sampled_rkl_gradient_is_the_reverse_kls_in_expectation():
    """Over many tokens drawn from the student, the mean gradient of the surrogate equals the exact
    reverse KL's gradient (autograd), within its Monte Carlo error, at each of three positions with
    different teachers. It fails without the detach, with the reward's sign flipped, or with the
    teacher's log-prob read at another position."""
    g = torch.Generator().manual_seed(0)
    L, N = 3, 200_000
    s = torch.randn(L, 5, generator=g)
    t = torch.randn(L, 5, generator=g) * 2
    q = torch.softmax(s, -1)
    tokens = torch.multinomial(q, N, replacement=True, generator=g).T       # (N, L), y ~ q
    log_p = torch.log_softmax(t, -1)
    teacher_token_logprobs = log_p.gather(-1, tokens.T).T                    # (N, L)
    s_mc = s.clone().requires_grad_()
    sampled_rkl(s_mc.expand(N, L, 5), teacher_token_logprobs, tokens).sum().backward()
    mc = s_mc.grad / N
    # per-draw gradients, for the Monte Carlo error: (log q(y) - log p(y)) (onehot(y) - q)
    log_q = torch.log_softmax(s, -1)
    r = (log_q.gather(-1, tokens.T).T - teacher_token_logprobs)[..., None]   # (N, L, 1)
    per_draw = r * (torch.nn.functional.one_hot(tokens, 5) - q)
    se = per_draw.std(0) / math.sqrt(N)
    assert torch.allclose(per_draw.mean(0), mc, atol=1e-5)
    s_ex = s.clone().requires_grad_()
    token_divergence(s_ex, t, "rkl").sum().backward()
    assert (s_ex.grad.abs() > 0.05).any()
    assert ((mc - s_ex.grad).abs() <= 4 * se + 1e-6).all(), (mc, s_ex.grad, se)
    # the value is the surrogate, (log q(y) - log p(y)) * log q(y), per position, in float32
    value = sampled_rkl(s, teacher_token_logprobs[0], tokens[0])
    lq = log_q.gather(-1, tokens[0][:, None])[:, 0]
    assert value.dtype == torch.float32 and value.shape == (L,)
    assert torch.allclose(value, (lq - teacher_token_logprobs[0]) * lq, rtol=1e-6)


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


# --- the divergences of 2024-26: skew KL (DistiLLM), AKL, entropy-aware (EOPD), vOPD's baseline ---
def brute_new(s, t, kind, skew=0.1, entropy=1.0):
    """The papers' formulas, one position at a time, in float64 Python arithmetic."""
    kl = kl_py
    out = torch.empty(s.shape[:-1], dtype=torch.float64)
    for idx, q, p in positions(s, t):
        if kind == "skl":  # KL(p || a p + (1 - a) q)
            out[idx] = kl(p, [skew * x + (1 - skew) * y for x, y in zip(p, q)])
        elif kind == "akl":  # the head: the teacher's top tokens until their mass reaches 1/2
            order, mass, head = sorted(range(len(p)), key=lambda i: -p[i]), 0.0, set()
            for i in order:
                if mass >= 0.5:
                    break
                head.add(i)
                mass += p[i]
            g_head = sum(abs(p[i] - q[i]) for i in head)
            g_tail = sum(abs(p[i] - q[i]) for i in range(len(p)) if i not in head)
            out[idx] = (g_head * kl(p, q) + g_tail * kl(q, p)) / (g_head + g_tail)
        else:  # eopd: reverse KL, plus forward KL where the teacher's entropy is above the threshold
            h = -sum(x * math.log(x) for x in p if x > 0)
            out[idx] = kl(q, p) + (kl(p, q) if h > entropy else 0.0)
    return out


@pytest.mark.parametrize("kind,skew,entropy", [("skl", 0.1, 1.0), ("skl", 0.4, 1.0), ("akl", 0.1, 1.0),
                                               ("eopd", 0.1, 1.5), ("eopd", 0.1, 2.0)])
def test_the_new_divergences_equal_their_papers_formulas_in_float64(kind, skew, entropy):
    """At 12 positions with different teachers: the value, and for eopd the threshold crossed at some
    positions and not at others (fails with the skew's two weights swapped, the head cut one token
    early or late, the gap's shares swapped, or the entropy taken of the student)."""
    s, t = logits_pair(5)
    t = t / 2  # entropies from about 0.5 to 2.3 nats: on both sides of the thresholds
    got = token_divergence(s, t, kind, skew=skew, entropy=entropy)
    assert got.shape == (3, 4) and got.dtype == torch.float32
    assert torch.allclose(got.double(), brute_new(s, t, kind, skew, entropy), rtol=1e-5, atol=1e-7)
    if kind == "eopd":
        h = -(torch.softmax(t, -1) * torch.log_softmax(t, -1)).sum(-1)
        assert (h > entropy).any() and (h < entropy).any()


def test_the_new_divergences_closed_cases():
    """skew KL of two disjoint one-hot distributions is -log a; AKL of two tokens whose head and tail
    gaps are equal is (FKL + RKL) / 2; EOPD on a uniform teacher over 4 tokens (entropy log 4) adds
    the forward KL below log 4 and not above it; each is 0 where student and teacher agree."""
    big = -1e4
    s, t = torch.tensor([[0.0, big]]), torch.tensor([[big, 0.0]])
    for a in (0.1, 0.3):
        assert token_divergence(s, t, "skl", skew=a).item() == pytest.approx(-math.log(a), rel=1e-5)
    p, q = torch.tensor([[0.8, 0.2]]), torch.tensor([[0.6, 0.4]])  # head {0}: gaps 0.2 and 0.2
    fkl, rkl = (p * (p / q).log()).sum(), (q * (q / p).log()).sum()
    assert token_divergence(q.log(), p.log(), "akl").item() == pytest.approx(((fkl + rkl) / 2).item(), rel=1e-5)
    uniform, s4 = torch.zeros(1, 4), torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    fkl4, rkl4 = (token_divergence(s4, uniform, k).item() for k in ("fkl", "rkl"))
    assert token_divergence(s4, uniform, "eopd", entropy=1.38).item() == pytest.approx(fkl4 + rkl4, rel=1e-5)
    assert token_divergence(s4, uniform, "eopd", entropy=1.39).item() == pytest.approx(rkl4, rel=1e-5)
    x, _ = logits_pair(6)
    for kind in ("skl", "akl", "eopd"):
        assert token_divergence(x, x, kind).abs().max() < 1e-5


def test_vopds_baseline_keeps_the_mean_gradient_and_lowers_its_variance():
    """Sampled-token on-policy distillation with the exact reverse KL as the baseline (vOPD): over
    200,000 tokens drawn from the student at three positions, the mean gradient is still the exact
    reverse KL's (within 4 Monte Carlo standard errors) and the variance of a token's gradient (its
    trace) is below the plain estimator's (fails with the baseline not detached, or taken of the
    forward KL, which moves the mean)."""
    g = torch.Generator().manual_seed(7)
    L, N, V5 = 3, 200_000, 5
    s, t = torch.randn(L, V5, generator=g), torch.randn(L, V5, generator=g) * 2
    tokens = torch.multinomial(torch.softmax(s, -1), N, replacement=True, generator=g).T  # (N, L)
    lp_y = torch.log_softmax(t, -1).gather(-1, tokens.T).T
    s_ex = s.clone().requires_grad_()
    token_divergence(s_ex, t, "rkl").sum().backward()
    grads = {}
    for name in ("plain", "vopd"):
        x = s.expand(N, L, V5).clone().requires_grad_()
        base = token_divergence(x, t.expand(N, L, V5), "rkl") if name == "vopd" else 0
        sampled_rkl(x, lp_y, tokens, base).sum().backward()
        grads[name] = x.grad                                    # (N, L, V): a token's gradient each
        se = grads[name].std(0) / math.sqrt(N)
        assert ((grads[name].mean(0) - s_ex.grad).abs() <= 4 * se + 1e-6).all(), name
    variance = {k: v.var(0).sum().item() for k, v in grads.items()}
    assert variance["vopd"] < 0.8 * variance["plain"], variance
