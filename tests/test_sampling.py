"""Generation: the KV cache is exact, greedy decoding matches the reference, sampling filters are right."""
import math

import torch

from common.model import GPT, GPTConfig, KVCache
from common.sampling import generate, sample_next
from conftest import hf_model, ours_from_hf


def small(block_size=64, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block_size, vocab_size=97, n_layer=2, n_head=4, n_embd=32, init_std=0.3)).eval()


@torch.no_grad()
def test_cached_and_uncached_logits_agree_at_every_step():
    m = small()
    seq = torch.randint(0, 97, (3, 30), generator=torch.Generator().manual_seed(0))
    full, _ = m(seq)
    cache = KVCache(m.config, 3, m.config.block_size, "cpu", torch.float32)
    step_logits, _ = m(seq[:, :10], kv_cache=cache)  # the prompt in one pass
    assert (step_logits - full[:, :10]).abs().max() < 1e-5
    for t in range(10, 25):  # then one token at a time
        step_logits, _ = m(seq[:, t:t + 1], kv_cache=cache)
        assert (step_logits[:, 0] - full[:, t]).abs().max() < 1e-5
    step_logits, _ = m(seq[:, 25:30], kv_cache=cache)  # several tokens after a cached prefix
    assert (step_logits - full[:, 25:30]).abs().max() < 1e-5


def test_greedy_matches_the_reference_generate():
    ref = hf_model()
    ours = ours_from_hf(ref)
    prompt = torch.randint(0, 500, (2, 7), generator=torch.Generator().manual_seed(3))
    expected = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                            pad_token_id=0, eos_token_id=None)
    got = generate(ours, prompt, 30, temperature=0)
    assert torch.equal(got, expected)


def test_top_k_1_and_tiny_top_p_are_greedy():
    m = small()
    prompt = torch.randint(0, 97, (4, 5), generator=torch.Generator().manual_seed(1))
    greedy = generate(m, prompt, 20, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate(m, prompt, 20, temperature=1.0, top_k=1, generator=g), greedy)
    assert torch.equal(generate(m, prompt, 20, temperature=1.0, top_p=1e-6, generator=g), greedy)


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    # 0.5 + 0.3 reaches 0.8: the nucleus is {1, 3}, drawn 5 : 3
    draws = sample_next(logits, top_p=0.8, generator=g)
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).float().mean().item() - 0.5 / 0.8) < 0.02
    # 0.81 needs the third token too
    assert set(sample_next(logits, top_p=0.81, generator=g).tolist()) == {1, 2, 3}
    # top-k 2 then top-p 0.5 within the renormalised top-2: 0.5/0.8 = 0.625 >= 0.5, so only token 1
    assert set(sample_next(logits, top_k=2, top_p=0.5, generator=g).tolist()) == {1}
    # temperature flattens: at T = 2 the draw frequencies follow softmax(log p / 2)
    d = sample_next(logits, temperature=2.0, generator=g)
    want = torch.softmax(probs.log() / 2, 0)
    assert abs((d == 0).float().mean().item() - want[0].item()) < 0.02


def test_top_p_boundary_with_exactly_representable_probabilities():
    """0.5, 0.25, 0.125, 0.125 are exact in binary, so the cumulative mass hits top_p exactly: with
    top_p = 0.75 the first two tokens already hold 0.75, and the third must not be kept."""
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_p=0.75, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample_next(logits, top_p=0.875, generator=g).tolist()) == {0, 1, 2}
    assert set(sample_next(logits, top_k=3, top_p=0.75, generator=g).tolist()) == {0, 1}  # 0.75/0.875 < 1


def test_same_seed_same_samples():
    m = small()
    prompt = torch.zeros(4, 1, dtype=torch.long)
    a = generate(m, prompt, 25, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = generate(m, prompt, 25, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
    c = generate(m, prompt, 25, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eos_stops_a_row_and_pads_it():
    m = small()
    prompt = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(5))
    free = generate(m, prompt, 20, temperature=0)
    eos = int(free[0, 4 + 5])  # the token row 0 produces at its 6th step
    out = generate(m, prompt, 20, temperature=0, eos_token=eos)
    assert out.shape == free.shape
    for row_free, row in zip(free, out):
        hits = (row_free[4:] == eos).nonzero()
        stop = 4 + int(hits[0]) if len(hits) else len(row)
        assert torch.equal(row[:stop + 1], row_free[:stop + 1])  # the same up to and including EOS
        assert (row[stop:] == eos).all()                       # then only EOS
    assert torch.equal(generate(m, prompt, 20, temperature=0, eos_token=None), free)


def test_prompts_of_different_lengths_share_a_batch():
    m = small().double()  # float64: batch size changes the rounding, and greedy ties must not flip
    prompts = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 1, 3)]
    idx = torch.zeros(3, 5, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, :len(p)] = p
    out = generate(m, idx, 12, temperature=0, prompt_lens=[5, 1, 3])
    assert out.shape == (3, 17)
    for i, p in enumerate(prompts):  # each row is what that prompt gives on its own
        alone = generate(m, p[None], 12, temperature=0)[0]
        assert torch.equal(out[i, :len(p) + 12], alone)


def test_a_mixed_batch_stops_rows_at_eos_or_at_their_own_length():
    m = small().double()
    idx = torch.tensor([[7, 8, 9, 10], [7, 0, 0, 0], [7, 0, 0, 0]])
    free = generate(m, idx, 10, temperature=0, prompt_lens=[4, 1, 1])
    eos = int(free[0, 4 + 2])  # row 0's third new token
    idx[2, :3] = torch.tensor([7, eos, 3])  # an eos inside a prompt must not stop the row
    out = generate(m, idx, 10, temperature=0, eos_token=eos, prompt_lens=[4, 1, 3])
    assert torch.equal(out[0, :7], free[0, :7]) and (out[0, 7:] == eos).all()
    for i, n in ((1, 1), (2, 3)):  # the same as alone, for its own prompt length + 10 tokens, then eos
        alone = generate(m, idx[i:i + 1, :n], 10, temperature=0, eos_token=eos)[0]
        assert torch.equal(out[i, :n + 10], alone) and (out[i, n + 10:] == eos).all()
    assert int(out[2, 3]) != eos  # row 2 went on after the eos in its prompt


def test_generation_past_the_context_crops_instead_of_crashing():
    m = small(block_size=16)
    out = generate(m, torch.zeros(2, 10, dtype=torch.long), 40, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 50)
    # Greedy from a 10-token prompt in a 16-token window: the 7th new token fills the window, so the
    # 8th is predicted after the cache restarts from the last half window (8 tokens).
    seven = generate(m, torch.zeros(1, 10, dtype=torch.long), 7, temperature=0)        # (1, 17)
    eighth = generate(m, torch.zeros(1, 10, dtype=torch.long), 8, temperature=0)[0, -1]
    logits, _ = m(seven[:, -8:])
    assert int(eighth) == int(logits[0, -1].argmax())


def test_generate_changes_no_value_and_the_model_still_trains():
    m = small()
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before, _ = m(x)
    generate(m, x[:, :3], 5, temperature=0)  # lays the linear weights out (in, out) in memory
    assert not m.transformer.h[0].mlp.c_fc.weight.is_contiguous()
    with torch.no_grad():
        after, _ = m(x)
    assert (before - after).abs().max() < 1e-5  # same values; a different kernel may round differently
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        _, loss = m(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_full_vocabulary_sampling_draws_each_token_with_its_probability():
    """No top-k, no top-p: sampling inverts the cumulative distribution. Over 40,000 seeded draws from
    fixed logits at T = 0.7, every token's frequency is its softmax probability (4 standard errors)."""
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.5, 0.0, -20.0], [0.0, 3.0, 0.0, -1.0, 1.0, 0.5]])
    g = torch.Generator().manual_seed(0)
    rows = logits.repeat_interleave(100, 0)  # (200, 6): each row 100 times
    draws = torch.cat([sample_next(rows, 0.7, generator=g).view(2, 100) for _ in range(400)], 1)  # (2, 40000)
    for row in range(2):
        got = torch.bincount(draws[row], minlength=6).double() / draws.size(1)
        p = torch.softmax(logits[row].double() / 0.7, -1)
        assert ((got - p).abs() <= 4 * (p * (1 - p) / draws.size(1)).sqrt() + 1e-12).all(), (got, p)


@torch.no_grad()
def test_every_token_past_the_context_sees_the_window_the_restart_rule_gives():
    """Greedy, a 3-token prompt, 30 new tokens in an 8-token window: several restarts. Brute force:
    token n is the argmax after out[start:n], with start moved to n - 4 (half the window) whenever
    n - start would exceed the window; no cache at all. A restart one token early, late or short
    picks other tokens."""
    m = small(block_size=8, seed=2).double()
    out = generate(m, torch.tensor([[5, 17, 3]]), 30, temperature=0)[0].tolist()
    start, want = 0, [5, 17, 3]
    for n in range(3, 33):
        if n - start > 8:
            start = n - 4
        logits, _ = m(torch.tensor([want[start:n]]))
        want.append(int(logits[0, -1].argmax()))
    assert out == want


def test_full_vocabulary_sampling_inverts_the_cdf_in_float64():
    """One token holds half the mass, 50,256 share the rest (1e-5 each): a float32 running sum drifts
    by more than a token's width, so its draws land on neighbours. Each draw must be the token whose
    float64 cumulative probability first reaches the same uniform number."""
    logits = torch.full((1, 50257), 0.0)
    logits[0, 0] = math.log(50256.0)  # p(token 0) = 1/2
    cdf = torch.softmax(logits[0], -1).double().cumsum(-1)
    g, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(300):
        got = int(sample_next(logits, 1.0, generator=g))
        u = torch.rand(1, 1, generator=ref, dtype=torch.float64) * cdf[-1]
        assert got == int(torch.searchsorted(cdf, u[0]))


def test_a_half_precision_model_samples_from_float32_logits(monkeypatch):
    """A model with bf16 weights (02's teacher on a GPU): generate hands sample_next float32 logits,
    the float32 output layer applied to the hidden state, not their bf16 rounding."""
    import common.sampling as sampling
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=32)).to(torch.bfloat16)
    with torch.no_grad():
        m.lm_head.weight.mul_(40)  # logits of size ~100, as GPT-2's, where bf16 rounds by up to 0.25
    seen = []
    real = sampling.sample_next
    monkeypatch.setattr(sampling, "sample_next", lambda logits, *a, **k: seen.append(logits) or real(logits, *a, **k))
    idx = torch.tensor([[1, 2, 3]])
    generate(m, idx, 1, temperature=1.0)
    assert seen[0].dtype == torch.float32
    with torch.no_grad():
        h = m.hidden(idx)[:, -1]
    want = h.float() @ m.lm_head.weight.float().T
    assert torch.allclose(seen[0], want, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(seen[0], want.bfloat16().float(), rtol=1e-5, atol=1e-4)
