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
