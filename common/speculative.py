"""Speculative decoding, written out: a small draft model proposes a few tokens, the large target
model checks them all in one forward pass, and a rejection rule makes the output exactly the
target's own distribution (Leviathan et al., 2023; Chen et al., 2023).

One round, with the target's distribution p and the draft's q at each position:
  1. the draft samples g tokens x_1 .. x_g, one at a time, each from its q_i;
  2. the target reads them all in one forward pass, which gives p_1 .. p_{g+1};
  3. x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)), in order. At the first
     rejection, one token is drawn from max(0, p_i - q_i), renormalised, and the round ends; if all
     g are accepted, one more (the bonus token) is drawn from p_{g+1}.
Why it is exact: x_i is kept with probability sum_x q(x) min(1, p(x)/q(x)) = sum_x min(p(x), q(x)),
and then is distributed as min(p, q) / that sum; a rejection adds the rest, max(0, p - q), which is
p - min(p, q). Together: p, exactly. So the chance a proposal survives is sum_x min(p, q) =
1 - TVD(p, q): the better the draft imitates the target, the more tokens each target pass yields.

Both models keep a KV cache; after a rejection each cache is rolled back to the accepted prefix
(its position pointer moves back; what lay beyond is overwritten later), never recomputed.
"""
import torch
from torch.nn import functional as F

from common.distill import acceptance
from common.model import KVCache
from common.sampling import uniform


def sampling_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """The distribution a sampler with these settings draws from: logits (..., V) -> probabilities
    (..., V) in float64, after temperature, top-k and top-p exactly as sample_next applies them."""
    # Speculative decoding must use these, not softmax(logits): the acceptance ratio and the
    # residual are exact only for the distributions each side samples from (transformers #47932
    # took the ratio from the unprocessed distribution while drawing from the top-k one: a 0.05
    # TVD error in its output).
    logits = logits.double() / temperature
    if top_k is None and top_p is None:
        return F.softmax(logits, dim=-1)
    if top_k is not None:  # the k most likely, sorted high to low
        cand, ids = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
    else:
        cand, ids = torch.sort(logits, dim=-1, descending=True)
    probs = F.softmax(cand, dim=-1)  # renormalised over the candidates
    if top_p is not None:  # a token stays while the tokens ranked above it hold less than top_p
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return torch.zeros_like(logits).scatter(-1, ids, probs)


def draw(probs, generator=None):
    """One token from probs (V,), by inverting the cumulative distribution (float64)."""
    cdf = probs.cumsum(-1)
    u = uniform(1, generator, probs.device) * cdf[-1]
    return int(torch.searchsorted(cdf, u).clamp(max=len(probs) - 1))


class CachedModel:
    """A model with its KV cache and the tokens the cache holds; `logits` feeds only what the cache
    lacks, `rollback` forgets the positions after the first n."""

    def __init__(self, model, max_len):
        self.model = model
        p = next(model.parameters())
        self.cache = KVCache(model.config, 1, max_len, p.device, p.dtype)
        self.calls = 0  # forward passes

    @torch.no_grad()
    def logits(self, tokens, last_only=False):
        """float32 logits at every position of `tokens` the cache does not hold yet (or at the last
        one): the next-token logits after tokens[:i+1] for each such i."""
        feed = torch.tensor([tokens[self.cache.pos:]], device=self.cache.k.device)  # (1, new)
        h = self.model.hidden(feed, kv_cache=self.cache)[0]  # (new, C)
        self.calls += 1
        h = h[-1:] if last_only else h
        return F.linear(h.float(), self.model.lm_head.weight.float())  # (new or 1, V)

    def rollback(self, n):
        """Keep the first n positions of the cache (the rest is overwritten by later feeds)."""
        self.cache.pos = min(self.cache.pos, n)


@torch.no_grad()
def speculative_generate(target, draft, prompt, max_new_tokens, draft_tokens=4, temperature=1.0,
                         top_k=None, top_p=None, generator=None, eos_token=None):
    """Continue `prompt` (1-D) by max_new_tokens tokens (or up to and including eos_token),
    distributed as the target's own sampling with these settings, `draft` proposing draft_tokens at
    a time; batch 1, as in serving; temperature 0: the target's greedy output. Returns (new tokens,
    stats): proposed, accepted, target_calls, draft_calls (forward passes, the prompt's included)
    and trials, (accepted?, sum_x min(p, q) at its context) for each proposal."""
    # trials' overlaps average to the acceptance rate in expectation: 08 checks one by the other
    for model in (target, draft):
        if model.training:
            model.eval()
    tokens = prompt.tolist()
    n_prompt, total = len(tokens), len(tokens) + max_new_tokens
    block = min(target.config.block_size, draft.config.block_size)
    if total > block:
        raise ValueError(f"{total} tokens do not fit the models' context ({block})")
    big, small = CachedModel(target, total), CachedModel(draft, total)
    greedy = temperature == 0
    stats = {"proposed": 0, "accepted": 0, "rounds": 0, "trials": []}

    def probs_of(logits):  # (n, V) -> the distributions each side samples from, (n, V) float64
        if greedy:  # a one-hot on the argmax
            return F.one_hot(logits.argmax(-1), logits.size(-1)).double()
        return sampling_probs(logits, temperature, top_k, top_p)

    while len(tokens) < total:
        # --- 1. the draft proposes g tokens, one forward pass each ---
        g = min(draft_tokens, total - len(tokens))
        proposals, q = [], []
        for _ in range(g):
            logits = small.logits(tokens + proposals, last_only=True)  # (1, V)
            q_i = probs_of(logits)[0]  # (V,): what the draft samples from, after top-k and top-p
            x = int(q_i.argmax()) if greedy else draw(q_i, generator)
            proposals.append(x)
            q.append(q_i)
        # --- 2. the target scores the context and all proposals in one forward pass ---
        p = probs_of(big.logits(tokens + proposals)[-(g + 1):])  # (g + 1, V): p_1 .. p_{g+1}
        # --- 3. accept in order; at the first rejection draw from the residual and stop ---
        new = []  # the accepted proposals, then one token from the residual or the bonus
        for i, x in enumerate(proposals):
            overlap = float(acceptance(p[i], q[i]))  # the chance x_i is accepted
            if greedy:
                keep = int(p[i].argmax()) == x
            else:
                u = float(uniform(1, generator, "cpu"))
                keep = u < min(1.0, float(p[i][x] / q[i][x]))
            stats["trials"].append((keep, overlap))
            if not keep:
                residual = (p[i] - q[i]).clamp(min=0)
                new.append(int(residual.argmax()) if greedy else draw(residual, generator))
                break
            new.append(x)
        else:  # all g accepted: the bonus token, from the target's distribution after x_g
            new.append(int(p[g].argmax()) if greedy else draw(p[g], generator))
        stats["proposed"] += g
        stats["accepted"] += len(new) - 1  # every token but the last was a kept proposal
        stats["rounds"] += 1
        if eos_token is not None and eos_token in new:  # the text ends: keep up to the eos
            new = new[:new.index(eos_token) + 1]
            total = min(total, len(tokens) + len(new))
        tokens += new[:total - len(tokens)]
        # --- 4. both caches forget what follows the accepted prefix ---
        big.rollback(len(tokens) - 1)
        small.rollback(len(tokens) - 1)
    stats.update(target_calls=big.calls, draft_calls=small.calls)
    return tokens[n_prompt:], stats
