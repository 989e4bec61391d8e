"""Perplexity against closed forms, a per-token computation and the reference implementation."""
import math

import pytest
import torch
from torch.nn import functional as F

from common.model import GPT, GPTConfig, logits_fp32
from common.perplexity import perplexity, sequences_nll, sequences_perplexity, windows
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


def test_window_placement_exact():
    """(start, first new target) of each window, worked out by hand: window i reads tokens
    [i*stride, i*stride + W) and scores the targets not scored before, up to token start + W."""
    assert windows(20, 8, 3) == [(0, 1), (3, 9), (6, 12), (9, 15), (12, 18)]
    assert windows(10, 4, 4) == [(0, 1), (4, 5), (8, 9)]
    assert windows(9, 4, 1) == [(0, 1), (1, 5), (2, 6), (3, 7), (4, 8)]


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


@torch.no_grad()
def test_prompt_tokens_are_context_not_targets():
    """With prompt_lens, exactly the tokens after each prompt are scored, each given its full prefix:
    the same sum as a token-by-token computation, also for a sequence longer than the window."""
    m = small()
    seqs = [stream(n, seed=n) for n in (9, 14, 5, 30)]  # 30 > the window of 16
    P = [3, 1, 4, 7]
    nll, n = sequences_nll(m, seqs, batch_size=2, prompt_lens=P)
    want, count = 0.0, 0
    for s, p in zip(seqs, P):
        for j in range(p, len(s)):
            ctx = s[max(0, j - 16):j]  # the window a token gets (side-by-side windows for the long one)
            if len(s) > 17:
                start = max(st for st, _ in windows(len(s), 16) if st < j)
                ctx = s[start:j]
            want -= F.log_softmax(m(ctx[None])[0][0, -1], -1)[s[j]].item()
            count += 1
    assert n == count == sum(len(s) - p for s, p in zip(seqs, P))
    assert nll == pytest.approx(want, rel=1e-5)


class WrongOnPrompts(torch.nn.Module):
    """A model whose predictions are garbage at positions 0 .. P-2 (the ones whose targets are the
    prompt's tokens 1 .. P-1) and the wrapped model's everywhere else."""

    def __init__(self, model, P):
        super().__init__()
        self.model, self.P, self.config, self.lm_head = model, P, model.config, model.lm_head

    def hidden(self, x):
        h = self.model.hidden(x).clone()
        h[:, :self.P - 1] = torch.randn(h[:, :self.P - 1].shape, generator=torch.Generator().manual_seed(0)) * 30
        return h


def test_a_model_wrong_only_on_prompt_tokens_keeps_its_perplexity():
    m = small()
    seqs = [stream(n, seed=n) for n in (9, 14, 5, 12)]
    wrong = WrongOnPrompts(m, P=4)
    assert sequences_perplexity(wrong, seqs, prompt_lens=[4] * 4) == pytest.approx(
        sequences_perplexity(m, seqs, prompt_lens=[4] * 4), rel=1e-6)
    assert sequences_perplexity(wrong, seqs) > 10 * sequences_perplexity(m, seqs)  # scored, they would count


def test_logits_are_float32_under_autocast():
    m = small()
    x = stream(40, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = logits_fp32(m, x[None, :16])
        ppl_bf16 = perplexity(m, x)
    assert logits.dtype == torch.float32
    assert ppl_bf16 == pytest.approx(perplexity(m, x), rel=2e-2)  # the body ran in bf16; the head did not


def test_the_perplexity_written_out_in_lesson_05_equals_common_perplexity(course):
    """05's perplexity_by_hand (one sample, plain code) equals sequences_perplexity on the first 8 test
    samples, for the teacher and the trained student, the prompt left out in both."""
    from common.perplexity import sequences_perplexity
    from common.plumbing.artifacts import load_artifact, load_model
    from conftest import load_lesson
    lesson = load_lesson("05_evaluate.py")
    out = course[0]
    gen = load_artifact(str(out / "generated.pt"), "generated")
    for name in ("teacher", "student"):
        model, _ = load_model(str(out / f"{name}.pt"), name)
        for seq, P in list(zip(gen["test"], gen["test_prompt_lens"]))[:8]:
            want = sequences_perplexity(model, [seq], prompt_lens=[P])
            assert lesson.perplexity_by_hand(model, seq, P) == pytest.approx(want, rel=1e-5)


def test_04s_val_loss_scores_in_eval_mode_and_hands_the_model_back_training():
    """04 validates between training steps: dropout off while scoring, back on afterwards (a
    student left in eval mode would train without its --dropout from the first epoch end on)."""
    from common.plumbing.device import Precision
    from conftest import load_lesson
    val_loss = load_lesson("04_train.py").val_loss
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16, dropout=0.5)).train()
    data = {"val": [torch.randint(0, 50, (9,)), torch.randint(0, 50, (6,))], "val_prompt_lens": [2, 1]}
    a = val_loss(m, data, 2, Precision("cpu", "fp32"))
    assert m.training and a == val_loss(m, data, 2, Precision("cpu", "fp32"))  # no dropout inside
    nll, n = sequences_nll(m.eval(), data["val"], 2, [2, 1])
    assert a == nll / n


def test_agreement_counts_only_the_positions_the_teacher_sampled():
    """05's top-1 agreement and top-K KL against a position-by-position count, on a batch with
    prompts and padding: prompt and padding positions never count."""
    from common.data import make_batch
    from conftest import load_lesson
    L05 = load_lesson("05_evaluate.py")
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=1, n_head=2, n_embd=16)).eval()
    seqs = [torch.randint(0, 30, (n,)) for n in (9, 5, 7)]
    P = [3, 1, 4]
    with torch.no_grad():
        teacher = [torch.log_softmax(torch.randn(len(s) - 1, 30), -1).topk(4, -1) for s in seqs]
    ids = [t.indices.int() for t in teacher]
    lps = [t.values.half() for t in teacher]
    agree, kl = L05.agreement_and_kl(m, seqs, P, (ids, lps), 2)
    hits = n = 0
    for s, p, i in zip(seqs, P, ids):
        with torch.no_grad():
            top = m(s[None, :-1])[0][0].argmax(-1)  # (len - 1,)
        hits += int((top[p - 1:] == i[p - 1:, 0].long()).sum())
        n += len(s) - p
    assert agree == pytest.approx(hits / n)
    x, y, bi, bl = make_batch(seqs, ids, lps, prompt_lens=P)
    assert n == int((y != -100).sum()) and 0 < kl
