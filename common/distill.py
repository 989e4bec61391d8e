"""The distillation losses, and batching the teacher's samples for them.

Sequence-level KD (Kim & Rush, 2016): the student is trained with plain cross-entropy on text the
teacher generated. Soft-target KD (Hinton et al., 2015): the student also matches the teacher's
whole next-token distribution at every position, softened by a temperature T (over the teacher's
stored top K, renormalised, or with the rest of the vocabulary as one bucket: rest_bucket_kl; or
over N tokens drawn from it, 02's sampled cache: sampled_kl). token_divergence: the divergences of
full distributions that newer methods minimise (forward KL, reverse KL, GKD's generalized
Jensen-Shannon, total variation, DistiLLM's skew KL, AKL, entropy-aware). sampled_rkl: on-policy
distillation when the teacher gives only the log-probability of each token the student wrote.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn import functional as F

# the kinds with the teacher running beside the student (04 --kd)
ONLINE = ("fkl", "rkl", "jsd", "tvd", "skl", "akl", "eopd", "rkl-sampled", "rkl-vopd")
SAMPLED = ("rkl-sampled", "rkl-vopd")  # the online kinds that grade the tokens the student drew


@dataclass
class KD:
    """How the student learns from the teacher: 04's distillation flags in one object, and their
    defaults (04's --help shows these)."""
    kind: str = "seq"      # seq, soft, or an ONLINE kind (--kd)
    alpha: float = 0.5     # soft: the weight of the KL term; 1 - alpha: cross-entropy (--kd-alpha)
    T: float = 2.0         # soft: the softening temperature (--kd-temperature)
    beta: float = 0.5      # jsd: the mixture's weight (--jsd-beta)
    tail: str = "renorm"   # soft: the top K renormalised, "rest": a rest bucket, or "sampled":
    #                        02's sampled cache (--soft-tail)
    k: int = 0             # soft: the teacher's first k stored tokens, its k most likely (0: all)
    skew: float = 0.1      # skl: the teacher's share of the mixture KL(p || a p + (1 - a) q)
    entropy: float = 1.0   # eopd: the teacher entropy (nats) above which forward KL is added

    @property
    def online(self):
        """Whether the teacher runs beside the student (its full distributions, or its log-prob of
        each token the student wrote)."""
        return self.kind in ONLINE

    @classmethod
    def from_args(cls, args):
        return cls(args.kd, args.kd_alpha, args.kd_temperature, args.jsd_beta, args.soft_tail,
                   args.soft_k, args.skew, args.entropy_threshold)

    @classmethod
    def from_flags(cls, flags):
        """The KD of a list of 04's flags (["--kd", "jsd", "--jsd-beta", "0.3", ...], as 07 lists
        its methods); the flags not given at their defaults, flags of other things ignored."""
        given = dict(zip(flags[::2], flags[1::2]))
        kd = cls()
        for flag, name in FLAGS.items():
            if flag in given:
                setattr(kd, name, type(getattr(kd, name))(given[flag]))
        return kd


FLAGS = {"--kd": "kind", "--kd-alpha": "alpha", "--kd-temperature": "T", "--jsd-beta": "beta",
         "--soft-tail": "tail", "--soft-k": "k", "--skew": "skew",
         "--entropy-threshold": "entropy"}  # 04's flag -> KD's field


def loss_sums(logits, y, kd, topk=None, teacher_logits=None):
    """(training loss, cross-entropy), each SUMMED over the scored tokens (y != -100): the caller
    divides by the scored tokens of the whole step. logits (..., V), y (...), kd a KD; topk the
    teacher's (ids, log-probs) (..., K) for soft, teacher_logits (..., V) for the online kinds."""
    scored = y != -100
    # for the online kinds the cross-entropy is only reported: no graph (it would keep its tensors)
    with torch.no_grad() if kd.kind in ONLINE else nullcontext():
        ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1),
                             ignore_index=-100, reduction="sum")
    if kd.kind == "seq":
        return ce, ce
    if kd.kind in SAMPLED:  # the teacher's log-prob of each token the student wrote (rkl-vopd: and
        # the exact reverse KL at the position, as the baseline)
        log_p_y = F.log_softmax(teacher_logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
        baseline = token_divergence(logits, teacher_logits, "rkl") if kd.kind == "rkl-vopd" else 0
        surrogate = masked_sum(sampled_rkl(logits, log_p_y, y, baseline), scored)
        estimate = -ce - masked_sum(log_p_y, scored)  # sum of log q(y) - log p(y): the KL shown
        return surrogate - surrogate.detach() + estimate, ce  # its value, the surrogate's gradient
    if kd.kind in ONLINE:
        # float32 (B, L, V) tensors at the peak of forward + backward, beyond the two logits: 5.3
        # for fkl, 6.3 for rkl, 10.5 for jsd (python bench/divergence_memory.py; docs/lab.md)
        divergence = token_divergence(logits, teacher_logits, kd.kind, beta=kd.beta, skew=kd.skew,
                                      entropy=kd.entropy)
        return masked_sum(divergence, scored), ce
    if kd.tail == "rest":
        top = rest_bucket_kl(logits, *topk)
    elif kd.tail == "sampled":
        top = sampled_kl(logits, *topk)
    else:
        top = soft_kd_kl(logits, *topk, kd.T)
    return kd.alpha * kd.T * kd.T * masked_sum(top, scored) + (1 - kd.alpha) * ce, ce


def stored_targets(data, split, kd, rows):
    """What soft KD reads of the teacher's cache in generated.pt (02) for the samples `rows` of a
    split: top-K (ids, log-probs), the first kd.k of them if set, or the sampled (ids, counts)."""
    if kd.tail == "sampled":
        return ([data[f"{split}_sampled_ids"][r] for r in rows],
                [data[f"{split}_sampled_counts"][r] for r in rows])
    K = kd.k or None  # the first k stored are the k most likely (torch.topk sorts them)
    return ([data[f"{split}_topk_ids"][r][:, :K] for r in rows],
            [data[f"{split}_topk_logprobs"][r][:, :K] for r in rows])


def acceptance(p, q):
    """sum_x min(p, q) over the last axis, (..., V) -> (...): the chance a target that samples from
    p keeps a token a draft drew from q (speculative decoding), 1 - TVD(p, q)."""
    return torch.minimum(p, q).sum(-1)


def masked_sum(values, mask):
    """The sum of values where mask is True (same shapes). Not values[mask].sum(): selecting by a
    mask makes a tensor whose size depends on the data, so the CPU waits for the GPU to count it."""
    return torch.where(mask, values, 0.0).sum()


def token_divergence(student_logits, teacher_logits, kind, beta=0.5, temperature=1.0, skew=0.1,
                     entropy=1.0):
    """A divergence between the teacher's next-token distribution p and the student's q at every
    position: logits (..., V) of any float dtype -> (...) in float32, no reduction."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (..., V) student
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (..., V) teacher
    # fkl, sum p (log p - log q): pays where the teacher has mass and the student has not, so it
    # covers every token the teacher allows (mode-covering). rkl, sum q (log q - log p): pays for
    # mass where the teacher has little, so it may drop modes but invents none (mode-seeking);
    # per token, on any text: not MiniLLM, which samples whole sequences
    if kind == "fkl":
        return kl(log_p, log_q)
    if kind == "rkl":
        return kl(log_q, log_p)
    if kind == "jsd":  # GKD: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q;
        # bounded; / beta it tends to KL(p || q) as beta -> 0, / (1 - beta) to KL(q || p) as -> 1
        if not 0 < beta < 1:
            raise ValueError(f"the JSD's beta must be strictly between 0 and 1, got {beta}")
        # log m in log space: the log of a sum of probabilities underflows for unlikely tokens
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))  # (..., V)
        return beta * kl(log_p, log_m) + (1 - beta) * kl(log_q, log_m)
    if kind == "tvd":  # (1/2) sum |p - q|: 1 - TVD = sum min(p, q), the chance the teacher keeps
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)  # the student's draft (DistillSpec)
    if kind == "skl":  # DistiLLM's skew KL(p || a p + (1 - a) q): the student's zeros no longer
        # blow it up (its log is at least log a p), so its gradient stays bounded early on
        log_m = torch.logaddexp(log_p + math.log(skew), log_q + math.log(1 - skew))
        return kl(log_p, log_m)
    if kind == "akl":  # AKL (Wu et al., 2025): FKL and RKL mixed by where p and q differ
        p, q = log_p.exp(), log_q.exp()
        # the head: the teacher's most likely tokens up to half its mass (the one crossing it too)
        sorted_p, order = p.sort(-1, descending=True)
        head = torch.zeros_like(p, dtype=torch.bool).scatter(-1, order, sorted_p.cumsum(-1)
                                                             - sorted_p < 0.5)
        gap = (p - q).abs().detach()  # the weights steer the mix; they are not trained through
        g_head, g_tail = (gap * head).sum(-1), (gap * ~head).sum(-1)
        w_head = g_head / (g_head + g_tail).clamp(min=1e-12)
        # FKL is driven by the head, RKL by the tail: each weighted by its share of the gap
        return w_head * kl(log_p, log_q) + (1 - w_head) * kl(log_q, log_p)
    if kind == "eopd":  # entropy-aware (arXiv 2603.07079): RKL, + FKL where the teacher is unsure
        unsure = -(log_p.exp() * log_p).nan_to_num().sum(-1) > entropy   # H(p) in nats
        return kl(log_q, log_p) + torch.where(unsure, kl(log_p, log_q), 0.0)
    raise ValueError(f"unknown divergence {kind!r}: fkl, rkl, jsd, tvd, skl, akl or eopd")


def sampled_rkl(student_logits, teacher_token_logprobs, tokens, baseline=0):
    """On-policy distillation from sampled tokens (MiniLLM's policy gradient, per token; Thinking
    Machines' "On-Policy Distillation", 2025): student_logits (..., V), the teacher's log p of
    each token the student wrote (...), those tokens (...) -> the surrogate (...) whose gradient,
    over tokens drawn from the student at temperature 1, is the reverse KL's. baseline (...):
    subtracted from the reward (vOPD, arXiv 2605.07865: the exact reverse KL at the position)."""
    # The surrogate is (log q(y) - log p(y)).detach() * log q(y): its gradient (log q(y) - log p(y))
    # * grad log q(y) has, over y ~ q, the mean grad sum_y q (log q - log p), the reverse KL's (the
    # extra term, sum_y q grad log q = grad sum_y q, is 0). Without the detach the gradient would
    # gain the reward's own. It needs one teacher log-prob a token (what an inference server
    # returns) and no (..., V) divergence; it costs variance. Targets of -100 give any value.
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_q_y = log_q.gather(-1, tokens.clamp(min=0).long()[..., None])[..., 0]   # (...)
    reward = (log_q_y - teacher_token_logprobs.float()).detach()                 # per-token cost
    # a baseline b leaves the mean gradient alone (the mean of grad log q(y) over y ~ q is 0) and,
    # the closer b is to the reward, the smaller its variance: the reward's mean is the exact RKL
    if torch.is_tensor(baseline):
        baseline = baseline.detach()
    return (reward - baseline) * log_q_y


def kl(log_a, log_b):
    """KL(a || b) = sum a (log a - log b) over the last axis, from log-probabilities (..., V) ->
    (...); a token with a = 0 adds 0 (not 0 * inf = nan)."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)


def soft_kd_kl(logits, topk_ids, topk_logprobs, T=2.0):
    """KL(teacher_T || student_T) over the teacher's stored top K: the student's logits (B, L, V),
    the teacher's ids and log-probs (B, L, K) from lesson 02 -> (B, L). Soft KD's loss is T^2 times
    this (the softened gradient shrinks like 1/T^2: Hinton et al., section 2)."""
    # the teacher renormalised over its K (log-probs differ from logits by a constant: softmax
    # ignores it); the tail it drops is what the student is not asked to match
    p_log = F.log_softmax(topk_logprobs.float() / T, dim=-1)     # (B, L, K) teacher, over the K
    # the student's full distribution at T, read at the K: the KL is 0 only when it puts exactly
    # the teacher's renormalised mass there, so it also learns to leave the other tokens out
    q_log = F.log_softmax(logits.float() / T, dim=-1)            # (B, L, V) student
    q_log = q_log.gather(-1, topk_ids.long())                    # (B, L, K) read at the K ids
    return kl(p_log, q_log)                                      # (B, L)


def rest_bucket_kl(logits, topk_ids, topk_logprobs):
    """KL(teacher || student) over K + 1 buckets at T = 1: the teacher's K stored tokens and one
    "rest" bucket for all others, its mass 1 - the K tokens' on each side. logits (..., V): the
    student's; topk_ids, topk_logprobs (..., K): the teacher's (02 stores them) -> (...)."""
    # The stored log-probs are normalised over the whole vocabulary, so the cache already holds the
    # teacher's rest mass (no extra bytes), and the student is asked to leave that much outside the
    # K, not none (what renormalising over the K asks). Only at T = 1: a softened rest mass would
    # need the logits not kept. Merging tokens can only hide differences, so this is never above
    # the exact KL: a lower bound that tightens as K grows (TRL's loss_add_tail is this bucket).
    log_q = F.log_softmax(logits.float(), dim=-1)                                 # (..., V)
    ids = topk_ids.long()
    log_p = topk_logprobs.float()                                                 # (..., K)
    kept = kl(log_p, log_q.gather(-1, ids))                                      # the K tokens
    log_q_rest = log_q.scatter(-1, ids, -math.inf).logsumexp(-1)                 # the others
    p_rest = (-torch.expm1(torch.logsumexp(log_p, -1))).clamp(min=0)            # 1 - sum of p's
    rest = p_rest * (p_rest.clamp(min=1e-30).log() - log_q_rest)
    # no rest term where p_rest is 0, or where the bucket is empty (K = V: p_rest is rounding)
    return kept + torch.where((p_rest > 0) & (log_q_rest > -math.inf), rest, 0.0)


def sampled_kl(logits, ids, counts):
    """KL(t || student) at T = 1, t = counts / their sum: the teacher's sampled cache as a
    distribution over its distinct ids. logits (..., V), ids and counts (..., U) -> (...)."""
    # Its gradient in the logits is q - t (t sums to 1), and t's mean over the draws is the
    # teacher's p: the mean gradient is q - p, the full-vocabulary forward KL's. Top-K
    # renormalised gives q - p / (the K's mass) on the K and q elsewhere: biased, the tail untaught.
    counts = counts.float()
    t = counts / counts.sum(-1, keepdim=True).clamp(min=1)       # padding (count 0) adds 0
    log_q = F.log_softmax(logits.float(), dim=-1).gather(-1, ids.long())
    return kl(t.log(), log_q)


def soft_kd_loss(logits, topk_ids, topk_logprobs, mask, T=2.0):
    """T^2 * KL(teacher_T || student_T), averaged over the positions where mask is True (see
    soft_kd_kl)."""
    per_position = soft_kd_kl(logits, topk_ids, topk_logprobs, T)
    return T * T * (per_position * mask).sum() / mask.sum().clamp(min=1)
