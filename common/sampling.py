"""Sampling text from a GPT, from scratch: temperature, top-k, top-p (nucleus) and a KV cache; and
the teacher's sampled cache (tokens drawn from it at every position, for soft KD: sampled_cache)."""
import torch
from torch import nn
from torch.nn import functional as F

from common.model import KVCache

ASK_EVERY = {"cpu": 1}  # generate: tokens between asking whether every row has ended (default 16)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row of logits (B, vocab) -> (B,) LongTensor.

    Rather than masking and re-normalising the whole 50k vocabulary, we keep only the candidates
    (the top-k, then the nucleus within them) and draw among those: same distribution, less work.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)  # greedy
    logits = logits.float() / temperature
    if top_k is None and top_p is None:
        # The whole vocabulary: invert the cumulative distribution. One uniform number u per row
        # picks the first token whose cumulative probability reaches u. (torch.multinomial draws a
        # random number per entry: over 50,257 entries it is ~40x slower on a CPU.) float64, so that
        # a token of probability 1e-12 still moves the running sum.
        cdf = F.softmax(logits, dim=-1).double().cumsum(dim=-1)  # (B, vocab)
        u = uniform((cdf.size(0), 1), generator, cdf.device) * cdf[:, -1:]
        return torch.searchsorted(cdf, u).squeeze(1).clamp(max=cdf.size(-1) - 1)
    if top_k is not None:
        cand, cand_ids = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)  # (B, k), sorted
    else:
        cand, cand_ids = torch.sort(logits, dim=-1, descending=True)              # (B, vocab)
    probs = F.softmax(cand, dim=-1)  # re-normalised over the candidates
    if top_p is not None:
        # nucleus: the smallest set of most likely tokens whose probability reaches top_p. A token
        # stays if the mass of the tokens ranked above it is still below top_p (so the first
        # always stays). multinomial re-normalises what is left.
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
    # (B, 1) index into the candidates, drawn where the generator lives (CUDA refuses a CPU
    # generator for GPU tensors, and the reverse)
    at = generator.device if generator is not None else probs.device
    choice = torch.multinomial(probs.to(at), 1, generator=generator).to(probs.device)
    return cand_ids.gather(-1, choice).squeeze(1)


def uniform(shape, generator, device):
    """Uniform numbers in [0, 1) (float64) on `device`, drawn with `generator` on its own device: a
    CPU generator then gives the same numbers whether the model runs on a CPU or a GPU."""
    at = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=at, dtype=torch.float64).to(device)


def linear_weights_in_rows_first_layout(model):
    """Keep every nn.Linear weight's values and shape (out, in), laid out in memory as (in, out):
    on a CPU, x @ W.T for a few rows of x runs about 1.3x faster when W.T is the contiguous one."""
    # only the strides change (the same values, the same results up to rounding); done once, and
    # on CPUs only (measured there)
    for m in model.modules():
        if not isinstance(m, nn.Linear) or m.weight is model.transformer.wte.weight:
            continue  # (the tied embedding: see `head` in generate)
        if m.weight.device.type == "cpu" and m.weight.is_contiguous():
            m.weight.data = m.weight.data.t().contiguous().t()


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token=None,
             generator=None, prompt_lens=None, fast_layout=True):
    """Continue each row of idx (B, T) by max_new_tokens tokens -> (B, T + max_new_tokens).
    temperature 0 is greedy; a row that samples eos_token is filled with it from there on (and
    generation stops once every row has); prompt_lens (B,): prompts of different lengths, padded on
    the right (row i's result is out[i, :prompt_lens[i] + max_new_tokens]). The model is left in
    eval mode; fast_layout=False leaves its weights' memory layout alone (a model in training: its
    optimizer's state is laid out like its weights)."""
    # The prompt fills the KV cache in one forward pass; then each step feeds only the newest token.
    # Mixed prompt lengths: the shortest goes through first, and a row still inside its prompt is
    # fed its own next prompt token instead of a sampled one, so every row moves one position a
    # step and no attention mask is needed. Past block_size the context is cropped: when the cache
    # is full, the last half window becomes the new prompt.
    model.eval()
    if fast_layout:
        linear_weights_in_rows_first_layout(model)
    B, T = idx.shape
    lens = (torch.full((B,), T, device=idx.device) if prompt_lens is None else
            torch.as_tensor(prompt_lens, device=idx.device))
    if not bool(((lens >= 1) & (lens <= T)).all()):
        raise ValueError(f"prompt_lens must be between 1 and the padded prompt length {T}")
    block = model.config.block_size
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, B, min(block, T + max_new_tokens), idx.device, dtype)
    # Only the last position's logits are needed. lm_head's weight is the (vocab, C) embedding
    # matrix; for a few rows at a time, a product with a (C, vocab) copy reads memory about twice as
    # fast on CPUs, so we make that copy once per call (the teacher's is 150 MB; it is freed on
    # return). In float32 whatever the weights' dtype: the distribution sampled from is the
    # model's, not its bf16 rounding (logits of size 100 in bf16 are off by up to 0.25).
    head = model.lm_head.weight.t().float().contiguous()  # (C, vocab)
    out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)
    out[:, :T] = idx
    n = int(lens.min())  # positions filled in every row
    feed = idx[:, :n][:, -block:]  # the shortest prompt, cropped to the context; then one token
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    # bool(done.all()) makes the CPU wait for the GPU's queue to empty: free on a CPU, asked only
    # every 16 tokens on a GPU (rows already done are filled with eos_token meanwhile)
    ask_every = ASK_EVERY.get(idx.device.type, 16)
    while n < T + max_new_tokens:
        if cache.pos + feed.size(1) > cache.k.size(3):  # window full: restart from its last half
            cache.pos = 0
            feed = out[:, n - block // 2:n]
        h = model.hidden(feed, kv_cache=cache)[:, -1, :]  # (B, C)
        logits = h.float() @ head                         # (B, vocab): model(feed)'s last position
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        in_prompt = n < lens
        if prompt_lens is not None:
            nxt = torch.where(in_prompt, out[:, n], nxt)  # rows still in their prompt: its token
        if eos_token is not None:
            nxt = nxt.masked_fill(done, eos_token)
            done = done | ((nxt == eos_token) & ~in_prompt) | (n + 1 >= lens + max_new_tokens)
        out[:, n] = nxt
        n += 1
        feed = nxt.unsqueeze(1)  # (B, 1)
        if eos_token is not None and n % ask_every == 0 and bool(done.all()):
            out[:, n:] = eos_token
            break
    return out


@torch.no_grad()
def continue_each(model, prompts, new_tokens, eos_token, temperature=1.0, top_k=None, top_p=None,
                  generator=None, fast_layout=True):
    """Continue each prompt (a list of 1-D token tensors) by up to new_tokens[i] tokens, in one
    batch, stopping a row after it samples eos_token (which is kept) -> a list of prompt +
    continuation tensors on the CPU. The prompts may differ in length (see generate's
    prompt_lens)."""
    device = next(model.parameters()).device
    lens = [len(p) for p in prompts]
    idx = torch.full((len(prompts), max(lens)), eos_token, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        idx[i, :len(p)] = p
    out = generate(model, idx, max(new_tokens), temperature, top_k, top_p, eos_token=eos_token,
                   generator=generator, prompt_lens=lens, fast_layout=fast_layout).cpu()
    result = []
    for i, (p, n) in enumerate(zip(prompts, new_tokens)):
        sampled = out[i, len(p):len(p) + n]
        ends = (sampled == eos_token).nonzero()
        if len(ends):
            sampled = sampled[:int(ends[0]) + 1]  # up to and including the first eos_token
        result.append(torch.cat([p.cpu(), sampled]))
    return result


def sampled_cache(logits, draws, generator=None):
    """The teacher's sampled cache (Sparse Logit Sampling, Anshumann et al., 2025): draws tokens
    drawn from softmax(logits) at T = 1 at each of n positions, kept as the distinct ids and how
    often each came: logits (n, V) -> ids (n, U) int32, counts (n, U) uint8 (U the most distinct ids
    at any position; shorter rows padded with count 0). counts / draws has mean p: unbiased."""
    probs = F.softmax(logits.float(), dim=-1)                   # T = 1: the teacher's own p
    drawn = torch.multinomial(probs, draws, replacement=True, generator=generator)   # (n, N)
    drawn = drawn.sort(-1).values
    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]                 # the first of each run of an id
    counts = (drawn[:, :, None] == drawn[:, None, :]).sum(-1)    # (n, N): how often each id came
    counts = torch.where(first, counts, 0)                       # counted once, at its first
    order = torch.argsort((~first).to(torch.uint8), dim=-1, stable=True)  # the firsts to the front
    U = int(first.sum(-1).max())
    return (drawn.gather(-1, order)[:, :U].to(torch.int32),
            counts.gather(-1, order)[:, :U].to(torch.uint8))
