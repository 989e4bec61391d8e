"""Perplexity against closed forms, a per-token computation and the reference implementation."""
import math

import pytest
import torch
from torch.nn import functional as F

from common.model import GPT, GPTConfig
from common.perplexity import perplexity, sequences_perplexity, windows
from conftest import hf_model, ours_from_hf


def small(block_size=16):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=block_size, vocab_size=50, n_layer=2, n_head=2, n_embd=16, init_std=0.3)).eval()


def stream(n, vocab=50, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    m = small()
    with torch.no_grad():  # zero final LayerNorm: every logit is 0, every token has probability 1/50
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.zero_()
    assert perplexity(m, stream(100)) == pytest.approx(50, rel=1e-6)


def test_one_window_is_exp_mean_cross_entropy():
    m = small()
    x = stream(12)
    _, loss = m(x[None, :-1], x[None, 1:])
    assert perplexity(m, x) == pytest.approx(math.exp(loss.item()), rel=1e-6)


def test_every_token_after_the_first_is_scored_once():
    for n, W, s in [(100, 16, 16), (100, 16, 5), (17, 16, 3), (2, 16, 16), (50, 8, 1)]:
        scored = []
        for start, first_new in windows(n, W, s):
            end = min(start + W, n - 1)
            scored += list(range(first_new, end + 1))
            assert first_new > start and end - start <= W
        assert scored == list(range(1, n))


@torch.no_grad()
def direct(model, x, W, stride):
    """Token by token: the NLL of token j given the context its window gives it."""
    nll, n = 0.0, 0
    for start, first_new in windows(len(x), W, stride):
        for j in range(first_new, min(start + W, len(x) - 1) + 1):
            logits, _ = model(x[None, start:j])
            nll -= F.log_softmax(logits[0, -1], -1)[x[j]].item()
            n += 1
    return math.exp(nll / n)


@pytest.mark.parametrize("stride", [16, 6, 1])
def test_sliding_windows_equal_a_per_token_computation(stride):
    m, x = small(), stream(70, seed=1)
    assert perplexity(m, x, stride=stride, batch_size=3) == pytest.approx(direct(m, x, 16, stride), rel=1e-5)
    if stride < 16:  # more context per token than side-by-side windows: a different (lower here) number
        assert perplexity(m, x, stride=stride) != pytest.approx(perplexity(m, x), rel=1e-4)


@torch.no_grad()
def test_equals_the_reference_models_token_nlls_over_the_same_windows():
    ref = hf_model(n_positions=32, vocab_size=200)
    ours = ours_from_hf(ref)
    x = stream(150, vocab=200, seed=2)
    for stride in (32, 12):
        nll, n = 0.0, 0
        for start, first_new in windows(len(x), 32, stride):
            end = min(start + 32, len(x) - 1)
            logits = ref(x[None, start:end]).logits[0]                 # predicts tokens start+1 .. end
            logp = F.log_softmax(logits, -1)
            for j in range(first_new, end + 1):
                nll -= logp[j - start - 1, x[j]].item()
                n += 1
        assert n == len(x) - 1
        assert perplexity(ours, x, stride=stride) == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_sequences_ignore_padding_and_weight_by_tokens():
    m = small()
    seqs = [stream(n, seed=n) for n in (3, 12, 7, 17, 40)]  # the last is longer than the window
    one_by_one = sequences_perplexity(m, seqs, batch_size=1)   # no padding at all
    batched = sequences_perplexity(m, seqs, batch_size=4)      # short rows padded
    assert batched == pytest.approx(one_by_one, rel=1e-6)
    # token-weighted: the pooled NLL, not the mean of per-sequence perplexities
    from common.perplexity import stream_nll
    total = sum(stream_nll(m, s)[0] for s in seqs)
    count = sum(len(s) - 1 for s in seqs)
    assert batched == pytest.approx(math.exp(total / count), rel=1e-6)
