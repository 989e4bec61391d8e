"""Lesson 02: the teacher writes the training data. Sequence-level distillation trains the student
on text the teacher wrote, so these samples ARE the knowledge passed on. Sampling (temperature,
top-k, top-p, KV cache) is written from scratch in common/sampling.py, one step of it out here
(sampling_step_by_hand, on the teacher's real logits). The lesson drops degenerate samples, stores
the teacher's top-K next-token log-probabilities (04's soft targets; --cache-draws: also a sampled
cache, N tokens drawn from the teacher at each position), remembers each sample's prompt
length (only the tokens the teacher chose are trained on and scored), and splits the samples by
opening into train, val (04 picks its best student on it) and test (05 reports on it).

Reads:  artifacts/teacher.pt
Writes: artifacts/generated.pt  ({"kind": "generated", "train"/"val"/"test": [token tensors],
        "{split}_texts", "{split}_prompt_lens", "{split}_topk_ids", "{split}_topk_logprobs",
        "{split}_sampled_ids", "{split}_sampled_counts",
        "soft_targets": the teacher's top 10 at one position, at T = 1 and 2, ...})
Run:    python 02_generate.py             (add --preset tiny for a CPU smoke run)
"""
import random
import time

import torch

from common import toy_language
from common.model import logits_fp32
from common.plumbing.artifacts import (
    LessonError,
    check_preset,
    load_model,
    run_lesson,
    save_artifact,
)
from common.plumbing.cli import (
    fraction,
    lesson_parser,
    nonneg_float,
    nonneg_int,
    parse,
    positive_int,
    prob_float,
)
from common.plumbing.device import get_device, precision, sync
from common.sampling import generate, sample_next, sampled_cache
from common.tokenizer import EOT, get_tokenizer

# --- settings (flags left unset take the preset's values) ---
PRESETS = {
    "gpt2": dict(num_samples=500, max_new_tokens=256, batch_size=128),
    "tiny": dict(num_samples=256, max_new_tokens=96, batch_size=64),
}
# Openings written for this course, to spread the samples over many subjects. With --prompts
# mixed, half of the samples start from <|endoftext|> alone (GPT-2 writes whatever it likes) and
# half from one of these. Every sample starts with <|endoftext|>, GPT-2's document separator. The
# tiny preset's teacher knows only the toy language: it gets toy_language.OPENINGS.
TOPICS = [
    "The history of the Roman Empire", "In the kitchen, the secret to good bread is",
    "The new smartphone", "Scientists studying coral reefs have found",
    "When I was a child, my grandmother", "The football match", "How to plant tomatoes:",
    "The city council voted on Tuesday to", "Quantum computers work by", "Dear diary, today",
    "The stock market fell sharply after", "A short guide to learning the guitar:",
    "The old lighthouse keeper", "In 1969, astronauts", "The best way to learn a new language is",
    "Climate change is affecting farmers in", "The detective looked at the broken window and",
    "Python is a programming language that", "The recipe calls for two cups of flour,",
    "Our company is looking for a software engineer who", "The mountain village was quiet until",
    "Researchers at the university announced", "The film opens with a scene in which",
    "Here are five tips for better sleep:", "The election results showed that",
    "Once upon a time, a fox", "The museum's new exhibition explores",
    "Electric cars are becoming more popular because", "The band released their first album in",
    "Q: What causes the seasons? A:", "The hospital opened a new wing for",
    "After the storm, the fishermen", "The law was passed in", "My favourite book is",
    "The train from London to Paris", "Volcanoes form when", "The chess tournament ended with",
    "In the forest at night, you can hear", "The president said in a speech",
    "The small startup raised money to",
]


def sampling_step_by_hand(logits, temperature, top_k, top_p, generator=None):
    """One sampling step at one position, written out: logits (vocab,) -> (the token drawn, the
    candidates left, their probabilities). common.sampling.sample_next does this for a whole batch
    at every step of generate(); tests/test_generate.py checks that the two draw the same token."""
    if temperature == 0:  # greedy: always the most likely
        return int(logits.argmax()), logits.argmax()[None], torch.ones(1)
    # temperature: < 1 sharpens, > 1 flattens; top-k: the k most likely, renormalised
    top, ids = torch.topk(logits.float() / temperature, top_k)
    probs = torch.softmax(top, dim=-1)
    # top-p: a token stays while the tokens ranked above it hold less than top_p (the nucleus)
    mass_before = probs.cumsum(-1) - probs
    probs = probs.masked_fill(mass_before >= top_p, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)   # draw one, in proportion
    kept = probs > 0
    return int(ids[choice]), ids[kept], probs[kept] / probs[kept].sum()


def repeated_ngram_fraction(tokens, n=4):
    """Share of the n-grams that repeat an earlier one: 0 for varied text, near 1 for loops."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def get_args():
    p = lesson_parser(__doc__)
    flag = p.add_argument
    flag("--num-samples", type=positive_int, help="texts to generate (gpt2: 500, tiny: 256)")
    flag("--max-new-tokens", type=positive_int,
         help="tokens per sample after the prompt (gpt2: 256, tiny: 96)")
    flag("--temperature", type=nonneg_float, default=0.9, help="sampling temperature; 0 = greedy")
    flag("--top-k", type=positive_int, default=50, help="sample among the k most likely tokens")
    flag("--top-p", type=prob_float, default=0.95,
         help="nucleus: the smallest set with this much mass")
    flag("--batch-size", type=positive_int,
         help="sequences generated at once (gpt2: 128, tiny: 64)")
    flag("--seed", type=int, default=1337, help="seed for the sampling generator and the split")
    flag("--val-fraction", type=fraction, default=0.1,
         help="share of the openings (and of the unconditional samples) held out for validation")
    flag("--test-fraction", type=fraction, default=0.1,
         help="share of the openings (and of the unconditional samples) held out for the test set")
    flag("--topk-logits", type=nonneg_int, default=32,
         help="store the teacher's K most likely next tokens per position for soft KD (0: none)")
    flag("--cache-draws", type=nonneg_int, default=0,
         help="also store a sampled cache: N tokens drawn from the teacher at T = 1 per position, "
              "as distinct ids and counts, up to 255 (04 --soft-tail sampled; 0: none)")
    flag("--prompts", choices=["mixed", "unconditional", "topics"], default="mixed",
         help="start from <|endoftext|>, from our topic openings, or half and half")
    flag("--prompts-file",
         help="your own openings instead of ours: a UTF-8 text file, one opening per line (empty "
              "lines ignored); split by opening like ours")
    flag("--max-repeat", type=fraction, default=0.5,
         help="drop samples whose share of repeated 4-grams is above this")
    return parse(p, PRESETS)


# --- the steps of main, in the order they run ---
def read_openings(path):
    """The openings in a text file, one a line, empty lines skipped; refused in one line if the
    file is missing, not UTF-8 or empty."""
    try:
        with open(path, encoding="utf-8") as f:
            openings = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise LessonError(f"--prompts-file {path} not found: give a text file with one opening "
                          f"per line") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise LessonError(f"--prompts-file {path} is not a UTF-8 text file: save it as UTF-8, "
                          f"one opening per line") from None
    if not openings:
        raise LessonError(f"--prompts-file {path} holds no openings (empty lines are ignored): "
                          f"write one opening per line")
    return openings


def plan_openings(args, topics):
    """The opening text of each sample ("" for unconditional: <|endoftext|> alone)."""
    if args.prompts == "mixed":  # even samples unconditional, odd ones spread over the topics
        return ["" if i % 2 == 0 else topics[(i // 2) % len(topics)]
                for i in range(args.num_samples)]
    if args.prompts == "topics":
        return [topics[i % len(topics)] for i in range(args.num_samples)]
    return [""] * args.num_samples


def show_one_step(teacher, prompts, args, enc, device):
    """sampling_step_by_hand on the teacher's logits after the first opening, beside sample_next's
    draw with the same seed."""
    opening = next((p for p in prompts if len(p) > 1), prompts[0])
    with torch.no_grad():
        logits = logits_fp32(teacher, torch.tensor([opening], device=device))[0, -1].cpu()  # (V,)
    token, ids, probs = sampling_step_by_hand(logits, args.temperature, args.top_k, args.top_p,
                                              torch.Generator().manual_seed(args.seed))
    same = int(sample_next(logits[None], args.temperature, args.top_k, args.top_p,
                           torch.Generator().manual_seed(args.seed))[0])
    likeliest = ", ".join(f"{enc.decode([int(i)])!r} {float(q):.2f}"
                          for i, q in zip(ids[:5], probs[:5]))
    print(f"one step by hand after {enc.decode(opening[1:])!r}: {len(ids)} of the top {args.top_k} "
          f"tokens are in the top-p {args.top_p} nucleus; the likeliest {likeliest}; drew "
          f"{enc.decode([token])!r} (sample_next, same seed: {enc.decode([same])!r})")
    return opening, logits


def soft_targets(context, logits, enc, k=10, T=2.0):
    """The teacher's k likeliest next tokens at one position, with their probabilities at T = 1
    and at T (softmax over the whole vocabulary). This is what soft-target KD (Hinton et al., 2015)
    hands the student instead of one sampled token: which wrong answers are nearly right. At T > 1
    the distribution flattens and the small probabilities, the "dark knowledge", become visible.
    Printed as a table; 06 draws it beside the student's, before and after training."""
    p1, pT = torch.softmax(logits.float(), -1), torch.softmax(logits.float() / T, -1)
    ids = p1.topk(k).indices
    print(f"soft targets after {enc.decode(context[1:])!r}: the teacher's top {k} next tokens")
    print(f"  {'token':<14}{'T=1':>8}{f'T={T:g}':>8}")
    for i in ids.tolist():
        print(f"  {enc.decode([i])!r:<14}{float(p1[i]):>8.3f}{float(pT[i]):>8.3f}")
    print(f"  {f'the other {len(p1) - k:,}':<14}{1 - float(p1[ids].sum()):>8.3f}"
          f"{1 - float(pT[ids].sum()):>8.3f}")
    return {"context": list(context), "ids": ids.tolist(), "T": T, "p_T1": p1[ids].tolist(),
            "p_T": pT[ids].tolist()}


def generate_samples(teacher, prompts, args, device):
    """Every prompt continued by the teacher: [(tokens, prompt length, sample number)], and the
    tokens per second. Prompts go sorted by length, so a batch holds prompts of (nearly) the same
    length; generate() feeds each row its own prompt tokens until they run out (common/sampling.py),
    so one batch can mix lengths."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # shortest prompt first
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    samples, new_tokens = [], 0
    sync(device)
    t0 = time.time()
    for i, batch in enumerate(batches):
        lens = [len(prompts[n]) for n in batch]
        idx = torch.full((len(batch), max(lens)), EOT, dtype=torch.long)
        for j, n in enumerate(batch):
            idx[j, :lens[j]] = torch.tensor(prompts[n])
        out = generate(teacher, idx.to(device), args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, eos_token=EOT, generator=gen,
                       prompt_lens=lens).cpu()
        for row, P, n in zip(out, lens, batch):
            row = row[:P + args.max_new_tokens]
            ends = (row[P:] == EOT).nonzero()
            stop = P + int(ends[0]) + 1 if len(ends) else len(row)  # keep the ending <|endoftext|>
            samples.append((row[:stop].clone(), P, n))
            new_tokens += stop - P
        if (i + 1) % max(1, len(batches) // 5) == 0 or i + 1 == len(batches):
            sync(device)
            print(f"  batch {i + 1:3d}/{len(batches)} | {len(samples):4d} samples | "
                  f"{new_tokens / (time.time() - t0):,.0f} tok/s")
    sync(device)
    gen_time = time.time() - t0
    print(f"generated {len(samples)} samples, {new_tokens:,} new tokens in {gen_time:.1f}s "
          f"({new_tokens / gen_time:,.0f} tokens/s)")
    samples.sort(key=lambda sample: sample[2])  # back in plan order
    return samples, new_tokens / gen_time


def keep_good(samples, max_repeat):
    """The samples worth learning from, and how many of each kind were dropped."""
    kept, seen = [], set()
    dropped = {"empty or under 8 new tokens": 0, "repetitive": 0, "duplicate": 0}
    for tokens, P, n in samples:
        new = tokens[P:].tolist()
        if new and new[-1] == EOT:
            new = new[:-1]
        key = tuple(tokens.tolist())
        if len(new) < 8:
            dropped["empty or under 8 new tokens"] += 1
        elif repeated_ngram_fraction(new) > max_repeat:
            dropped["repetitive"] += 1
        elif key in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(key)
            kept.append((tokens, P, n))
    return kept, dropped


@torch.no_grad()
def teacher_caches(teacher, seqs, K, draws, device, generator):
    """For each sequence, at every position (row t: the teacher's distribution over the token that
    follows token t): its K most likely next tokens and their log-probs (int32 ids, float16: K=32
    costs 192 bytes a position instead of 200 KB), and, if draws, its sampled cache (ids and counts
    of draws tokens drawn at T = 1: sampled_cache). {"topk_ids": [...], ...}, a list per key."""
    cache = {key: [] for key in ("topk_ids", "topk_logprobs", "sampled_ids", "sampled_counts")}
    for i in range(0, len(seqs), 16):  # 16 at a time: each holds a (16, L, 50257) float32 tensor
        group = seqs[i:i + 16]
        x = torch.full((len(group), max(len(t) for t in group) - 1), EOT, dtype=torch.long)
        for j, t in enumerate(group):
            x[j, :len(t) - 1] = t[:-1]  # padding after the end is never looked at (causal)
        logits = logits_fp32(teacher, x.to(device))  # (B, L, V), float32 even for a half teacher
        if K:
            top, ids = torch.topk(logits, K, dim=-1)                        # (B, L, K)
            logp = top - torch.logsumexp(logits, dim=-1, keepdim=True)      # log-softmax at the K
        for j, t in enumerate(group):
            n = len(t) - 1  # the positions of this sequence (the rest is padding)
            if K:
                cache["topk_ids"].append(ids[j, :n].to(torch.int32).cpu())
                cache["topk_logprobs"].append(logp[j, :n].to(torch.float16).cpu())
            if draws:
                sampled = sampled_cache(logits[j, :n], draws, generator)
                cache["sampled_ids"].append(sampled[0].cpu())
                cache["sampled_counts"].append(sampled[1].cpu())
    return cache


def cache_bytes(cache, K, draws):
    """What a position of each cache costs, as one line."""
    line = [f"top-{K}: {K * 6} bytes (an int32 id and a float16 log-prob each)"] if K else []
    if draws:
        distinct = torch.cat([(c > 0).sum(-1) for c in cache["sampled_counts"]]).float().mean()
        line.append(f"sampled, {draws} draws: {distinct:.1f} distinct ids, {distinct * 5:.0f} "
                    f"bytes (an int32 id and a uint8 count each)")
    return "teacher's cache a position: " + " | ".join(line)


def split_by_opening(kept, plan, args):
    """{"train"|"val"|"test": indices into kept}. Samples that start from the same topic opening
    are alike, so a held-out sample must not share its opening with a training sample: each
    opening goes, whole, to one split. The unconditional samples (from <|endoftext|> alone) share
    no text and are spread over the three splits."""
    def assign(items, rng):
        """item -> 'val', 'test' or 'train', in the given shares, after a seeded shuffle."""
        items = list(items)
        rng.shuffle(items)
        # at least one item for a held-out split asked for, once there are 3 items to share out
        n_val, n_test = (0 if f == 0 or len(items) < 3 else max(1, round(f * len(items)))
                         for f in (args.val_fraction, args.test_fraction))
        return {item: "val" if j < n_val else "test" if j < n_val + n_test else "train"
                for j, item in enumerate(items)}

    rng = random.Random(args.seed)
    split_of_opening = assign(sorted(set(t for t in plan if t)), rng)
    split_of_unconditional = assign([n for n, t in enumerate(plan) if not t], rng)  # by number
    splits = {"train": [], "val": [], "test": []}
    for j, (_, _, n) in enumerate(kept):
        splits[split_of_opening[plan[n]] if plan[n] else split_of_unconditional[n]].append(j)
    for name in ("train", "val", "test"):
        if not splits[name] and (name == "train" or getattr(args, f"{name}_fraction") > 0):
            more = f" or --{name}-fraction" if name != "train" else ""
            raise LessonError(f"the {name} split is empty ({len(kept)} samples kept): raise "
                              f"--num-samples{more}")
    return splits


def main():
    args = get_args()
    enc = get_tokenizer()
    prec = precision(get_device())  # the device and the precision, decided once
    device = prec.device

    # --- the teacher, in half precision on a GPU (inference needs no fp32 master weights) ---
    teacher, ckpt = load_model(f"{args.out}/teacher.pt", "teacher", vocab_size=enc.n_vocab)
    check_preset(ckpt, f"{args.out}/teacher.pt", args.preset)
    teacher.to(device=device, dtype=prec.torch_dtype)
    print(f"teacher: {ckpt.get('source', '?')} | {teacher.num_params() / 1e6:.1f}M params | "
          f"{device} {prec.dtype}")

    # --- prompts ---
    topics = toy_language.OPENINGS if ckpt.get("language") == "toy" else TOPICS
    plan = plan_openings(args, read_openings(args.prompts_file) if args.prompts_file else topics)
    prompts = [[EOT] + enc.encode(text) for text in plan]
    if args.cache_draws > 255:
        raise LessonError(f"--cache-draws {args.cache_draws}: at most 255 (its counts are uint8)")
    if args.val_fraction + args.test_fraction >= 1:
        raise LessonError("--val-fraction plus --test-fraction must leave some samples for "
                          "training (sum < 1)")
    longest, context = max(len(t) for t in prompts), teacher.config.block_size
    if longest + args.max_new_tokens > context:
        raise LessonError(f"--max-new-tokens {args.max_new_tokens} plus a {longest}-token prompt "
                          f"exceeds the teacher's context of {context}: use --max-new-tokens "
                          f"{context - longest} or less")
    print(f"prompts: {args.prompts} ({len(set(plan) - {''})} topic openings) | {args.num_samples} "
          f"samples x {args.max_new_tokens} new tokens | T={args.temperature} top-k={args.top_k} "
          f"top-p={args.top_p}")

    # --- one sampling step, by hand, on the teacher's real next-token logits after one opening ---
    opening, logits = show_one_step(teacher, prompts, args, enc, device)
    # --- soft targets: the teacher's whole distribution at that position, at T = 1 and T = 2 ---
    soft = soft_targets(opening, logits, enc)

    # --- generate, then drop empty, degenerate and duplicate samples ---
    samples, tokens_per_second = generate_samples(teacher, prompts, args, device)
    kept, dropped = keep_good(samples, args.max_repeat)
    print(f"kept {len(kept)} of {len(samples)} | dropped: "
          + ", ".join(f"{v} {k}" for k, v in dropped.items()))
    if len(kept) < 2:
        raise LessonError("fewer than 2 usable samples: raise --num-samples or --temperature")

    # --- the teacher's top-K next-token log-probabilities at every position, for soft KD; and
    # its sampled cache (tokens drawn from it: unbiased, where top-K drops the tail) ---
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)  # not the samples' stream
    cache = teacher_caches(teacher, [t for t, _, _ in kept], args.topk_logits, args.cache_draws,
                           device, gen)
    if args.topk_logits or args.cache_draws:
        print(cache_bytes(cache, args.topk_logits, args.cache_draws))

    # --- train / val / test, split by opening ---
    splits = split_by_opening(kept, plan, args)
    data = {"kind": "generated", "preset": args.preset, "teacher_config": ckpt["config"],
            "settings": dict(vars(args)), "dropped": dropped,
            "tokens_per_second": tokens_per_second, "soft_targets": soft}
    for name, rows in splits.items():
        data[name] = [kept[j][0] for j in rows]
        data[f"{name}_prompt_lens"] = [kept[j][1] for j in rows]
        data[f"{name}_openings"] = sorted(set(plan[kept[j][2]] for j in rows if plan[kept[j][2]]))
        data[f"{name}_texts"] = [enc.decode(kept[j][0].tolist()) for j in rows]
        for key, values in cache.items():  # topk_ids, topk_logprobs, sampled_ids, sampled_counts
            data[f"{name}_{key}"] = [values[j] for j in rows] if values else []
    n_tok = sum(len(t) for t, _, _ in kept)
    n_new = sum(len(t) - P for t, P, _ in kept)
    print(" | ".join(f"{name} {len(rows)} samples ({len(data[f'{name}_openings'])} openings)"
                     for name, rows in splits.items())
          + f" | {n_tok:,} tokens, {n_new:,} of them sampled (mean {n_tok / len(kept):.0f} per "
            f"sample)")
    for text in data["train_texts"][:3]:
        print("  ---\n  " + text.replace("<|endoftext|>", "").strip()[:300].replace("\n", "\n  "))

    path = f"{args.out}/generated.pt"
    save_artifact(data, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    run_lesson(main, oom="a smaller --batch-size (texts generated at once)")
