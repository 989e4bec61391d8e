"""The distillation losses, and batching the teacher's samples for them.

Sequence-level KD (Kim & Rush, 2016): the student is trained with plain cross-entropy on text the
teacher generated. Soft-target KD (Hinton et al., 2015): the student also matches the teacher's
whole next-token distribution at every position, softened by a temperature T. token_divergence: the
divergences of full distributions that newer methods minimise (forward KL, reverse KL as in MiniLLM,
GKD's generalized Jensen-Shannon).
"""
import math

import torch
from torch.nn import functional as F

from common.perplexity import pad_batch


def token_divergence(student_logits, teacher_logits, kind, beta=0.5, temperature=1.0):
    """A divergence between the teacher's next-token distribution p and the student's q at every
    position: logits (..., V) of any float dtype -> (...) in float32, no reduction.

    "fkl", forward KL(p || q) = sum p (log p - log q): the student pays wherever the teacher puts
      mass and it does not, so it must cover every token the teacher allows (mode-covering). Where
      the teacher's mass is spread over many continuations, a small student spreads itself thin.
    "rkl", reverse KL(q || p) = sum q (log q - log p): the student pays for mass where the teacher
      has little, so it may drop some of the teacher's modes but must not invent any
      (mode-seeking). MiniLLM (Gu et al., 2024) minimises a reverse KL, over whole sequences.
    "jsd", GKD's generalized Jensen-Shannon (Agarwal et al., 2024): with m = beta p + (1 - beta) q,
      beta KL(p || m) + (1 - beta) KL(q || m). It is bounded, and it moves between the two: divided
      by beta it tends to KL(p || q) as beta -> 0, divided by 1 - beta to KL(q || p) as beta -> 1.
      log m is taken in log space (logsumexp of log p + log beta and log q + log(1 - beta)), never
      as the log of a sum of probabilities, which underflows for unlikely tokens.
    All of it in float32, from log-softmax at the given temperature.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (..., V) student
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (..., V) teacher
    if kind == "fkl":
        return _kl(log_p, log_q)
    if kind == "rkl":
        return _kl(log_q, log_p)
    if kind == "jsd":
        if not 0 < beta < 1:
            raise ValueError(f"the JSD's beta must be strictly between 0 and 1, got {beta}")
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))  # (..., V)
        return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)
    raise ValueError(f"unknown divergence {kind!r}: fkl, rkl or jsd")


def _kl(log_a, log_b):
    """KL(a || b) = sum a (log a - log b) over the last axis, from log-probabilities; a token with
    a = 0 adds 0 (not 0 * inf = nan)."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)


def soft_kd_kl(logits, topk_ids, topk_logprobs, T=2.0):
    """KL(teacher_T || student_T) at every position -> (B, L), over the teacher's stored top K.
    The loss of soft-target KD is T^2 times this, averaged over the scored positions.

    logits (B, L, V): the student's. topk_ids, topk_logprobs (B, L, K): the teacher's K most likely
    next tokens and their log-probabilities, stored by lesson 02.

    The approximation: we kept only the teacher's top K tokens, so its softened distribution is
    re-normalised over those K (softmax(logprob / T) over K; log-probs differ from logits by a
    constant per position, which softmax ignores). For GPT-2 the top 32 tokens usually hold most of
    the mass; the tail we drop is what the student is not asked to match. The student's side is its
    full distribution at temperature T, read at the K ids: sum_k p_k (log p_k - log q_k) is then >=
    0 and zero only when the student puts exactly the teacher's (re-normalised) mass on those K
    tokens, so it also learns to leave the other tokens out.

    Why T^2 (applied by the caller): the gradient of the softened KL shrinks like 1/T^2, so scaling
    by T^2 keeps its size comparable to the cross-entropy term whatever T is (Hinton et al., 2.).
    """
    p_log = F.log_softmax(topk_logprobs.float() / T, dim=-1)     # (B, L, K) teacher, over the K
    q_log = F.log_softmax(logits.float() / T, dim=-1)            # (B, L, V) student
    q_log = q_log.gather(-1, topk_ids.long())                    # (B, L, K) read at the K ids
    return _kl(p_log, q_log)                                     # (B, L)


def soft_kd_loss(logits, topk_ids, topk_logprobs, mask, T=2.0):
    """T^2 * KL(teacher_T || student_T), averaged over the positions where mask is True (see
    soft_kd_kl)."""
    kl = soft_kd_kl(logits, topk_ids, topk_logprobs, T)
    return T * T * (kl * mask).sum() / mask.sum().clamp(min=1)


def make_batch(seqs, topk_ids=None, topk_logprobs=None, device="cpu", prompt_lens=None):
    """Pad a list of token sequences into model inputs and targets (see perplexity.pad_batch).

    x[:, t] is token t, y[:, t] is token t+1 (the one to predict); padding and prompt targets are
    -100, which cross_entropy skips. We pad rather than pack several samples into one row: each
    sample is a document that starts with <|endoftext|>, and its stored teacher distributions line
    up with its own positions. The padding costs a little compute. Returns x, y and, if given, the
    teacher's top-K ids and log-probs padded to (B, L, K).
    """
    x, y = pad_batch(seqs, prompt_lens)
    out = [x.to(device), y.to(device)]
    if topk_ids is not None:
        B, L, K = x.size(0), x.size(1), topk_ids[0].size(-1)
        ids = torch.zeros(B, L, K, dtype=torch.int32)
        lps = torch.zeros(B, L, K, dtype=torch.float16)
        for i, (a, b) in enumerate(zip(topk_ids, topk_logprobs)):
            ids[i, :len(a)] = a
            lps[i, :len(b)] = b
        out += [ids.to(device), lps.to(device)]
    return out
