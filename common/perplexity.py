"""Perplexity from scratch: exp of the mean negative log-likelihood per predicted token.

A model with a window of W tokens cannot read a long text at once, so we slide windows over it.
Window i feeds tokens [i*stride, i*stride + W) and predicts the token after each of them. Every
token after the first is scored exactly once, in the first window that holds it as a new target,
with all the context that window gives. stride = W: windows side by side (fast, but a token early
in a window has little context); stride < W: overlapping windows, only the last `stride` targets of
each are new, and each of those sees at least W - stride tokens of context (slower, lower ppl).

This is the method of the transformers guide "Perplexity of fixed-length models", with one fix:
the guide turns each window's mean loss back into a sum by multiplying by (valid targets - batch
size), to account for the shift that drops one label. For windows after the first with stride < W
the dropped label was already masked, so that count is one short: each later window is weighted by
trg_len - 1 instead of trg_len tokens. Here we add up the per-token NLLs themselves and count them.

Two details that keep the number honest: the logits are float32 even under bf16/fp16 autocast (a
bf16 logit carries ~3 significant digits; log-softmax over 50,257 of them would add rounding noise
to the score), and tokens that were given rather than predicted (a prompt) can be left out of the
score.
"""
import math

import torch
from torch.nn import functional as F

from common.data import batches, pad_batch
from common.model import logits_fp32


def windows(n_tokens, block_size, stride=None):
    """(start, first_new) for each window: inputs tokens[start:start+block_size], targets shifted by
    one; targets at positions >= first_new are new (positions counted in the whole stream)."""
    stride = stride or block_size
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be between 1 and the window ({block_size}), got {stride}")
    out, scored_to = [], 1  # token 0 has no context, so scoring starts at token 1
    start = 0
    while scored_to < n_tokens:
        end = min(start + block_size + 1, n_tokens)  # the window's last target is token end - 1
        out.append((start, scored_to))
        scored_to = end
        start += stride
    return out


@torch.no_grad()
def stream_nll(model, tokens, stride=None, batch_size=8, score_from=1):
    """(sum of token NLLs, number of scored tokens) over a 1-D token stream; tokens before position
    score_from are context only (e.g. a prompt)."""
    W = model.config.block_size
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    total, count = 0.0, 0
    spans = windows(len(tokens), W, stride)
    for i in range(0, len(spans), batch_size):
        group = spans[i:i + batch_size]
        L = max(min(s + W, len(tokens) - 1) - s for s, _ in group)  # the batch's longest input
        x = torch.zeros(len(group), L, dtype=torch.long, device=device)
        y = torch.full((len(group), L), -100, dtype=torch.long, device=device)  # -100: not scored
        for j, (s, first_new) in enumerate(group):
            e = min(s + W, len(tokens) - 1)           # inputs s .. e-1, targets s+1 .. e
            x[j, :e - s] = tokens[s:e]
            keep = first_new - (s + 1)                 # targets before first_new: scored before
            y[j, keep:e - s] = tokens[first_new:e + 1]
            y[j, :max(0, score_from - (s + 1))] = -100  # targets before score_from are context only
        logits = logits_fp32(model, x)
        nll = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-100,
                              reduction="sum")
        total += nll.item()
        count += int((y != -100).sum())
    return total, count


def perplexity(model, tokens, stride=None, batch_size=8):
    """Perplexity of a 1-D LongTensor token stream, windows of model.config.block_size tokens."""
    total, count = stream_nll(model, tokens, stride, batch_size)
    return math.exp(total / count)


@torch.no_grad()
def sequences_nll(model, seqs, batch_size=8, prompt_lens=None):
    """(sum of NLLs, scored tokens) over separate sequences (e.g. generated samples), each scored
    from its own start; padding is excluded, and so are the first prompt_lens[i] tokens of sequence
    i if given (they were the prompt, not the model's prediction). Sequences longer than the window
    are scored with stream_nll."""
    W = model.config.block_size
    device = next(model.parameters()).device
    P = list(prompt_lens) if prompt_lens is not None else [1] * len(seqs)
    total, count = 0.0, 0
    short = [i for i, s in enumerate(seqs) if len(s) <= W + 1]
    for i, s in enumerate(seqs):
        if len(s) > W + 1:
            t, c = stream_nll(model, s, batch_size=batch_size, score_from=P[i])
            total, count = total + t, count + c
    for i in range(0, len(short), batch_size):
        group = short[i:i + batch_size]
        x, y = pad_batch([seqs[j] for j in group], [P[j] for j in group], device)
        logits = logits_fp32(model, x)
        total += F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-100,
                                 reduction="sum").item()
        count += int((y != -100).sum())
    return total, count


def sequences_perplexity(model, seqs, batch_size=8, prompt_lens=None):
    """Token-weighted perplexity over a list of 1-D LongTensors (prompt tokens not scored, if
    given)."""
    total, count = sequences_nll(model, seqs, batch_size, prompt_lens)
    return math.exp(total / count)


@torch.no_grad()
def score_sampled(models, seqs, prompt_lens, measure, batch_size=8, topk=None):
    """Held-out scoring: measure(y (n,), each model's float32 logits (n, V)[, the stored top-K ids
    and log-probs (n, K)]) -> (k, n) at the n positions whose next token was sampled (no prompt,
    no padding). Returns its sums per sequence (k, len(seqs)), float64, and the positions per
    sequence (len(seqs),)."""
    # the one loop every lesson that measures uses (05, 07, 08, 09); its precision is the caller's
    # autocast
    sums, counts = [], []
    device = next(models[0].parameters()).device
    for x, y, *stored in batches(seqs, prompt_lens, batch_size, device, topk):
        scored = y != -100
        logits = [logits_fp32(m, x, scored) for m in models]       # (n, V) each: scored only
        values = measure(y[scored], *logits, *(t[scored] for t in stored))  # (k, n)
        row = scored.nonzero()[:, 0]                                # each position's sequence
        per_seq = torch.zeros(values.size(0), x.size(0), dtype=values.dtype, device=values.device)
        sums.append(per_seq.index_add_(1, row, values).double().cpu())  # (k, B)
        counts.append(scored.sum(-1).cpu())
    return torch.cat(sums, 1), torch.cat(counts)
