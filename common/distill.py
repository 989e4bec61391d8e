"""The two distillation losses, and batching the teacher's samples for them.

Sequence-level KD (Kim & Rush, 2016): the student is trained with plain cross-entropy on text the
teacher generated. Soft-target KD (Hinton et al., 2015): the student also matches the teacher's whole
next-token distribution at every position, softened by a temperature T.
"""
import torch
from torch.nn import functional as F


def soft_kd_loss(logits, topk_ids, topk_logprobs, mask, T=2.0):
    """T^2 * KL(teacher_T || student_T), averaged over the positions where mask is True.

    logits (B, L, V): the student's. topk_ids, topk_logprobs (B, L, K): the teacher's K most likely
    next tokens and their log-probabilities, stored by lesson 02.

    The approximation: we kept only the teacher's top K tokens, so its softened distribution is
    re-normalised over those K (softmax(logprob / T) over K; log-probs differ from logits by a constant
    per position, which softmax ignores). For GPT-2 the top 32 tokens usually hold most of the mass;
    the tail we drop is what the student is not asked to match. The student's side is its full
    distribution at temperature T, read at the K ids: sum_k p_k (log p_k - log q_k) is then >= 0 and
    zero only when the student puts exactly the teacher's (re-normalised) mass on those K tokens,
    so it also learns to leave the other tokens out.

    Why T^2: the gradient of the softened KL shrinks like 1/T^2, so scaling by T^2 keeps its size
    comparable to the cross-entropy term whatever T is chosen (Hinton et al., section 2).
    """
    p_log = F.log_softmax(topk_logprobs.float() / T, dim=-1)               # (B, L, K) teacher, re-normalised
    q_log = F.log_softmax(logits.float() / T, dim=-1).gather(-1, topk_ids.long())  # (B, L, K) student
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)                           # (B, L)
    return T * T * (kl * mask).sum() / mask.sum().clamp(min=1)


def distill_loss(logits, ce, targets, topk_ids, topk_logprobs, alpha=0.5, T=2.0):
    """Hinton's mix: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE on the teacher's tokens."""
    kd = soft_kd_loss(logits, topk_ids, topk_logprobs, targets != -100, T)
    return alpha * kd + (1 - alpha) * ce


def make_batch(seqs, topk_ids=None, topk_logprobs=None, device="cpu"):
    """Pad a list of token sequences into model inputs and targets.

    x[:, t] is token t, y[:, t] is token t+1 (the one to predict). Sequences are padded at the end;
    padded targets are -100, which cross_entropy skips. We pad rather than pack several samples into
    one row: each sample is a document that starts with <|endoftext|>, and its stored teacher
    distributions line up with its own positions. The padding costs a little compute.
    Returns x, y and, if given, the teacher's top-K ids and log-probs padded to (B, L, K).
    """
    B, L = len(seqs), max(len(s) for s in seqs) - 1
    x = torch.zeros(B, L, dtype=torch.long)
    y = torch.full((B, L), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, :len(s) - 1] = s[:-1]
        y[i, :len(s) - 1] = s[1:]
    out = [x.to(device), y.to(device)]
    if topk_ids is not None:
        K = topk_ids[0].size(-1)
        ids = torch.zeros(B, L, K, dtype=torch.int32)
        lps = torch.zeros(B, L, K, dtype=torch.float16)
        for i, (a, b) in enumerate(zip(topk_ids, topk_logprobs)):
            ids[i, :len(a)] = a
            lps[i, :len(b)] = b
        out += [ids.to(device), lps.to(device)]
    return out
