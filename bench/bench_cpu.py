"""Benchmark: our hand-written code against transformers' GPT2LMHeadModel, same config, same work.

The two are timed interleaved in one run (ours, reference, ours, reference, ...) because shared
machines are noisy; we report medians and the ratio reference time / our time (> 1: we are faster).
  train   one training step (forward + backward + AdamW) of the student config 6/512/8, batch 4 x 256
  sample  64 new tokens for 8 prompts, top-k 50, with the KV cache (GPT-2 124M shape); also
          timed once: the same without a KV cache, the naive loop
  ppl     perplexity forward passes over a 4,097-token stream (4 full windows), 1,024-token windows (GPT-2 124M shape)
  matmul  this CPU's fp32 matmul rate, and our training FLOP rate as a share of it
Weights are random: speed does not depend on their values. Needs transformers (requirements-dev.txt).
Run: python bench/bench_cpu.py [--repeats 5] [--only train,sample,ppl] [--keep-freed-memory]
"""
import argparse
import os
import statistics
import sys
import time

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.model import GPT, fused_adamw  # noqa: E402
from common.perplexity import stream_nll, windows  # noqa: E402
from common.plumbing.device import keep_freed_memory  # noqa: E402
from common.sampling import generate  # noqa: E402

TARGETS = {"train": 1.10, "sample": 1.5, "ppl": 1.0}


def reference_and_ours(n_layer, n_embd, n_head, seed=0):
    """A transformers GPT-2 and our GPT with the same weights (through our own checkpoint loader)."""
    import tempfile

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    from common.gpt2_weights import load_gpt2
    logging.set_verbosity_error()
    torch.manual_seed(seed)
    ref = GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0))
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        config, state = load_gpt2(d)
    ours = GPT(config)
    ours.load_state_dict(state)
    return ref, ours


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleave(ours_fn, ref_fn, repeats):
    ours_fn(), ref_fn()  # warm-up: allocator, kernels, caches
    t_ours, t_ref = [], []
    for i in range(repeats):
        pair = [(ours_fn, t_ours), (ref_fn, t_ref)]
        for fn, acc in (pair if i % 2 == 0 else pair[::-1]):  # alternate who goes first
            acc.append(timed(fn))
    return statistics.median(t_ours), statistics.median(t_ref)


def bench_train(repeats):
    ref, ours = reference_and_ours(6, 512, 8)
    ref.train(), ours.train()
    x = torch.randint(0, 50257, (4, 257), generator=torch.Generator().manual_seed(0))
    fused = fused_adamw("cpu")  # the same optimizer on both sides, as 04_train.py sets it up
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=fused)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=fused)

    def step_ours():
        _, loss = ours(x[:, :-1], x[:, 1:])
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_ref():
        loss = ref(x[:, :-1], labels=x[:, :-1]).loss  # transformers shifts the labels inside
        loss.backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)

    t_ours, t_ref = interleave(step_ours, step_ref, repeats)
    cfg = ours.config
    tokens = x.size(0) * (x.size(1) - 1)
    # FLOPs per token, forward + backward: 6 per weight (lm_head included, position embeddings not)
    # plus attention
    n = ours.num_params() - ours.transformer.wpe.weight.numel()
    flops = tokens * (6 * n + 12 * cfg.n_layer * cfg.n_embd * (x.size(1) - 1))
    return t_ours, t_ref, flops / t_ours


def bench_sample(repeats):
    ref, ours = reference_and_ours(12, 768, 12)
    ref.eval(), ours.eval()
    prompt = torch.randint(0, 50257, (8, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompt)

    def run_ours():
        generate(ours, prompt, 64, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def run_ref():
        out = ref.generate(prompt, attention_mask=mask, do_sample=True, top_k=50, top_p=1.0, temperature=1.0,
                           max_new_tokens=64, min_new_tokens=64, pad_token_id=50256, eos_token_id=None)
        assert out.shape == (8, 80)

    t_ours, t_ref = interleave(run_ours, run_ref, repeats)
    t_naive = timed(lambda: naive_generate(ours, prompt, 64, 50, torch.Generator().manual_seed(0)))
    return t_ours, t_ref, t_naive


@torch.no_grad()
def naive_generate(model, idx, max_new_tokens, top_k, generator):
    """Sampling without a KV cache, the textbook way: the whole sequence through the model at every
    step, top-k by masking the full vocabulary, softmax over all 50,257 entries."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:])
        logits = logits[:, -1, :]
        kth = torch.topk(logits, top_k).values[:, -1:]
        probs = F.softmax(logits.masked_fill(logits < kth, float("-inf")), dim=-1)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return idx


def bench_ppl(repeats):
    ref, ours = reference_and_ours(12, 768, 12)
    ref.eval(), ours.eval()
    tokens = torch.randint(0, 50257, (4097,), generator=torch.Generator().manual_seed(0))

    def run_ours():
        stream_nll(ours, tokens, batch_size=4)

    @torch.no_grad()
    def run_ref():  # the same windows and batches, scored with the reference model
        spans = windows(len(tokens), 1024)
        for i in range(0, len(spans), 4):
            group = spans[i:i + 4]
            x = torch.stack([tokens[s:s + 1024] for s, _ in group])  # 4,097 tokens: 4 full windows
            y = torch.stack([tokens[s + 1:s + 1025] for s, _ in group])
            logits = ref(x).logits
            F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()

    return interleave(run_ours, run_ref, repeats)


def matmul_rate(n=2048, repeats=10):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each side (medians reported)")
    p.add_argument("--only", default="train,sample,ppl", help="comma-separated subset of train,sample,ppl")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="set malloc to keep freed memory, as 04_train.py does on the CPU (common/plumbing/device.py)")
    args = p.parse_args()
    which = args.only.split(",")
    # One process times both sides, so the malloc setting applies to both alike.
    kept = args.keep_freed_memory and keep_freed_memory()
    print(f"torch {torch.__version__} | {torch.get_num_threads()} threads | {os.cpu_count()} CPUs | "
          f"malloc keeps freed memory: {'yes' if kept else 'no'} | AdamW fused: {fused_adamw('cpu')} | "
          f"{time.strftime('%Y-%m-%d')}")
    ok = True
    rate = matmul_rate()
    print(f"fp32 matmul rate (2048^3): {rate / 1e9:.1f} GFLOP/s")
    for name, fn in (("train", bench_train), ("sample", bench_sample), ("ppl", bench_ppl)):
        if name not in which:
            continue
        t_ours, t_ref, *extra = fn(args.repeats)
        ratio = t_ref / t_ours
        ok &= ratio >= TARGETS[name]
        print(f"{name:<7} ours {t_ours * 1000:8.1f} ms | reference {t_ref * 1000:8.1f} ms | ratio {ratio:.2f}x "
              f"(target >= {TARGETS[name]:.2f}x) {'ok' if ratio >= TARGETS[name] else 'MISSED'}")
        if name == "sample":
            print(f"        without the KV cache (naive loop, once): {extra[0] * 1000:.1f} ms = "
                  f"{8 * 64 / extra[0]:.0f} tokens/s, against our {8 * 64 / t_ours:.0f} tokens/s")
        if name == "train":
            share = extra[0] / rate
            ok &= share >= 0.55
            print(f"        training at {extra[0] / 1e9:.1f} GFLOP/s = {share:.0%} of the matmul rate "
                  f"(target >= 55%) {'ok' if share >= 0.55 else 'MISSED'}")
    print("all targets met" if ok else "some targets missed")


if __name__ == "__main__":
    main()
