"""Lesson 08: the student at work, as the draft in speculative decoding (Leviathan et al., 2023;
Chen et al., 2023): it proposes a few tokens, the teacher checks them all in one forward pass, and
a rejection rule keeps the output exactly the teacher's distribution (common/speculative.py). A
proposal survives with chance sum_x min(p, q) = 1 - TVD(p, q) at temperature 1, which distillation
can train for (DistillSpec, Zhou et al., 2024). For each draft, sampling setting and number of
draft tokens g: the acceptance beside its expectation, 1 - TVD held out, tokens per teacher call
beside the closed form (1 - a^(g+1)) / (1 - a), and the speedup beside its prediction (the columns:
docs/speculative.md).

Reads:  artifacts/teacher.pt, student_init.pt, student.pt, generated.pt (and, where lesson 07 ran,
        methods.pt and each method's student_last.pt: more drafts)
Writes: artifacts/speculative.md, speculative.png, speculative.pt
Run:    python 08_speculative.py         (add --preset tiny after the tiny course)
"""
import math
import os
import time

import torch

from common.distill import acceptance
from common.perplexity import score_sampled
from common.plumbing.artifacts import (
    LessonError,
    check_preset,
    load_artifact,
    load_model,
    run_lesson,
    save_artifact,
    write_text,
)
from common.plumbing.charts import plt, save_chart
from common.plumbing.cli import lesson_parser, parse, positive_int
from common.plumbing.device import get_device, sync
from common.sampling import generate
from common.speculative import sampling_probs, speculative_generate
from common.tokenizer import EOT, get_tokenizer

# --- settings ---
PRESETS = {"gpt2": dict(prompts=16, new_tokens=64), "tiny": dict(prompts=6, new_tokens=48)}
DRAFT_TOKENS = (1, 2, 4, 8)
SEED = 1234


def get_args():
    p = lesson_parser(__doc__)
    p.add_argument("--prompts", type=positive_int,
                   help="test prompts to continue (gpt2: 16, tiny: 6)")
    p.add_argument("--new-tokens", type=positive_int,
                   help="tokens to write after each prompt (gpt2: 64, tiny: 48)")
    p.add_argument("--draft-tokens", default=",".join(map(str, DRAFT_TOKENS)),
                   help="the numbers of draft tokens g to try, comma-separated")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="timings of every model and run, interleaved: the median and its range "
                        "are reported (one timing on a busy machine can be off by 2x)")
    return parse(p, PRESETS)


# --- the measurements ---
def draft_files(out):
    """The drafts: the untrained student, the course's student, and each of lesson 07's students
    (its first seed at the rate it chose, as methods.pt lists them)."""
    files = {"student_init": f"{out}/student_init.pt", "student": f"{out}/student.pt"}
    if os.path.exists(f"{out}/methods.pt"):
        lab = load_artifact(f"{out}/methods.pt", "methods")
        for name, row in lab["rows"].items():
            path = f"{out}/{row['folders'][0]}/student_last.pt" if row.get("folders") else None
            if path and os.path.exists(path):
                files[f"07: {name}"] = path
    return files


def held_out_overlap(teacher, draft, seqs, prompt_lens, kw, batch_size=8):
    """The mean of sum_x min(p, q) over the sampled positions of the teacher's held-out samples,
    p and q as each side would sample (exact, full vocabulary): 1 - TVD, a proposal's chance."""
    def measure(y, t, d):  # (1, n): the acceptance at each position
        return acceptance(sampling_probs(t, **kw), sampling_probs(d, **kw))[None]
    sums, counts = score_sampled([teacher, draft], seqs, prompt_lens, measure, batch_size)
    return float(sums.sum() / counts.sum())


def step_time(model, prompts, new_tokens, device):
    """Seconds per new token of plain sampling (KV cache, batch 1), the median of the prompts."""
    times = []
    for prompt in prompts:
        sync(device)
        t0 = time.time()
        generate(model, prompt[None].to(device), new_tokens, temperature=1.0,
                 generator=torch.Generator(device=device).manual_seed(SEED))
        sync(device)
        times.append((time.time() - t0) / new_tokens)
    return sorted(times)[len(times) // 2]


def interleaved(timers, repeats, warm_up=True):
    """Each timer run `repeats` times, in turns (a b c, a b c, ...), after one warm-up run each if
    asked (a model's first call pays one-time costs): whatever else the machine does meanwhile
    slows them alike. Returns {name: sorted values}."""
    for timer in timers.values() if warm_up else ():
        timer()
    values = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            values[name].append(timer())
    return {name: sorted(v) for name, v in values.items()}


def median(values):
    return values[len(values) // 2]


def plain_speed(teacher, prompts, new_tokens, kw, device):
    """Tokens per second of the teacher sampling alone with these settings, batch 1, each text
    ending at its <|endoftext|> as in speculative decoding."""
    written = 0
    sync(device)
    t0 = time.time()
    for prompt in prompts:
        out = generate(teacher, prompt[None].to(device), new_tokens, **kw, eos_token=EOT,
                       generator=torch.Generator(device=device).manual_seed(SEED))[0]
        new = out[len(prompt):].tolist()
        written += new.index(EOT) + 1 if EOT in new else len(new)
    sync(device)
    return written / (time.time() - t0)


def run(teacher, draft, prompts, new_tokens, g, kw):
    """Speculative decoding over every prompt: acceptance, its expectation, tokens per teacher
    call, tokens per second, and the spread of (accepted - expected) over the proposals."""
    device = next(teacher.parameters()).device.type
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    trials, calls, written = [], 0, 0
    sync(device)
    t0 = time.time()
    for prompt in prompts:
        new, stats = speculative_generate(teacher, draft, prompt.to(device), new_tokens, g,
                                          generator=gen, eos_token=EOT, **kw)
        trials += stats["trials"]
        calls += stats["target_calls"]
        written += len(new)
    sync(device)
    seconds = time.time() - t0
    kept = torch.tensor([float(k) for k, _ in trials], dtype=torch.float64)
    expected = torch.tensor([m for _, m in trials], dtype=torch.float64)
    diff = kept - expected  # mean 0 if the rule is right; its standard error says how close
    return {"acceptance": float(kept.mean()), "expected": float(expected.mean()),
            "diff_2se": 2 * float(diff.std() / math.sqrt(len(diff))),
            "tokens_per_call": written / calls, "tok_s": written / seconds,
            "proposals": len(trials), "tokens": written}


def line(r):
    return (f"  {r['setting']:<14} {r['draft']:<22} g={r['g']} | acceptance {r['acceptance']:.3f} "
            f"(expected {r['expected']:.3f} +-{r['diff_2se']:.3f}) | tokens/call "
            f"{r['tokens_per_call']:.2f} (closed form {r['closed_form']:.2f}) | speedup "
            f"{speedup_text(r)} (predicted {r['predicted']:.2f}x)")


def speedup_text(r):
    """The median speedup with its range; marked where it is above what the draft's acceptance
    allows (tokens per teacher call: a free draft's speedup), which only timing noise can give."""
    text = f"{r['speedup']:.2f}x ({r['speedup_lo']:.2f}-{r['speedup_hi']:.2f})"
    return text + (" (above the tokens per call: noise)" if r["speedup"] > r["tokens_per_call"]
                   else "")


# --- the report and the figure ---
def report(rows, steps, args, n_prompts, source):
    """speculative.md: how it was measured, the table, and how to read it."""
    md = ["# Speculative decoding with the student as the draft\n",
          f"Teacher (the target): {source}. {n_prompts} prompts of the teacher's held-out test "
          f"samples, {args.new_tokens} new tokens each, batch 1, on this machine; the output is "
          f"the teacher's own distribution in every row. Every timing is the median of "
          f"{args.repeats}, the models and runs timed in turns (min-max in brackets). One "
          f"decoding step, plain sampling: " + ", ".join(
              f"{n} {1e3 * median(t):.2f} ms ({1e3 * t[0]:.2f}-{1e3 * t[-1]:.2f})"
              for n, t in steps.items()) + ".\n",
          "| setting | draft | 1 - TVD held out | g | acceptance | expected (± 2 se) | "
          "tokens / teacher call | closed form | c | speedup | predicted |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['setting']} | {r['draft']} | {r['held_out']:.3f} | {r['g']} | "
                  f"{r['acceptance']:.3f} | {r['expected']:.3f} ± {r['diff_2se']:.3f} | "
                  f"{r['tokens_per_call']:.2f} | {r['closed_form']:.2f} | {r['c']:.2f} | "
                  f"{speedup_text(r)} | {r['predicted']:.2f}x |")
    best = max(rows, key=lambda r: r["speedup"])
    real = sorted(r["speedup"] / r["predicted"] for r in rows)[len(rows) // 2]
    md += ["", "How to read it: acceptance is the share of the draft's proposals the teacher "
           "kept; it matches sum_x min(p, q) at the same contexts (expected), which is what a "
           "draft's imitation buys, and 1 - TVD held out predicts it without sampling. Tokens per "
           "teacher call rise with g and with acceptance; the closed form assumes every proposal "
           "has the same chance, so it misses where real acceptance varies from token to token. "
           "Tokens per call are also the most speculative decoding can gain (were the draft free): "
           "a measured speedup above them is timing noise, and says so. "
           "Speculative decoding pays only when tokens per call exceed g c + 1: here the best "
           f"row is {best['draft']} at g={best['g']} ({best['setting']}), {speedup_text(best)}. "
           f"Measured speedups are a median {real:.0%} of the predicted ones: the prediction "
           "counts forward passes only, while each round also turns logits into the "
           "distributions both sides sample from (full vocabulary, float64) and runs the rule in "
           "Python. A draft that costs most of a teacher step (c here: the table) cannot pay, "
           "whatever its acceptance; what makes it pay is a teacher much larger than the draft "
           "(GPT-2 124M against a 6-layer student on a GPU, c well under 0.1), a draft trained "
           "for acceptance, and the batched verification real servers use."]
    return md


def chart(rows, overlap, gs, path):
    """Left: each draft's acceptance (all g pooled) with its held-out 1 - TVD; right: speedup."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    names = list(dict.fromkeys(r["draft"] for r in rows))
    colors = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}  # 11 drafts and more
    width = 0.8 / len(settings)
    for j, setting in enumerate(settings):
        ys = [i + j * width for i in range(len(names))]
        pooled = []
        for n in names:
            mine = [r for r in rows if r["draft"] == n and r["setting"] == setting]
            pooled.append(sum(r["acceptance"] * r["proposals"] for r in mine)
                          / sum(r["proposals"] for r in mine))
        ax.barh(ys, pooled, width, label=f"acceptance, {setting}", alpha=0.85)
        ax.scatter([overlap[n][setting] for n in names], ys, marker="|", s=200, color="black",
                   label="1 - TVD on held-out text" if j == 0 else None, zorder=3)
    ax.set_yticks([i + width * (len(settings) - 1) / 2 for i in range(len(names))], names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"share of proposals the teacher kept (g = {', '.join(map(str, gs))} pooled)")
    ax.set_title("How often the teacher keeps each draft's token")
    ax.legend(fontsize=7, loc="lower right")
    for name in names:
        for setting, style in zip(settings, ["-", "--"]):
            pts = [(r["g"], r["speedup"]) for r in rows
                   if r["draft"] == name and r["setting"] == setting]
            bx.plot(*zip(*pts), style, marker="o", color=colors[name],
                    label=name if style == "-" else None)
    bx.axhline(1.0, color="black", lw=1, ls=":")
    bx.set_xticks(gs)
    bx.set_xlabel("draft tokens per round (g)")
    bx.set_ylabel("speedup over the teacher alone (measured)")
    bx.set_title(f"Does it pay? (above 1: faster; solid {settings[0]}, dashed {settings[-1]})")
    bx.legend(fontsize=7, ncol=2)
    save_chart(fig, path)


def main():
    args = get_args()
    device = get_device()
    enc = get_tokenizer()
    try:
        gs = sorted({int(g) for g in args.draft_tokens.split(",") if g.strip()})
    except ValueError:
        gs = []
    if not gs or gs[0] < 1:
        raise LessonError(f"--draft-tokens {args.draft_tokens!r}: give whole numbers >= 1, e.g. "
                          f"1,2,4")

    # --- the teacher, the drafts, the held-out prompts ---
    teacher, ckpt = load_model(f"{args.out}/teacher.pt", "teacher", vocab_size=enc.n_vocab)
    check_preset(ckpt, f"{args.out}/teacher.pt", args.preset)
    teacher.to(device)
    drafts = {}
    for name, path in draft_files(args.out).items():
        drafts[name], _ = load_model(path, ("student_init", "student"), vocab_size=enc.n_vocab)
        drafts[name].to(device)
    data = load_artifact(f"{args.out}/generated.pt", "generated",
                         keys=("test", "test_prompt_lens", "settings"))
    test, test_P = data["test"], data["test_prompt_lens"]
    prompts = [s[:P] for s, P in zip(test, test_P)][:args.prompts]
    longest = max(len(p) for p in prompts) + args.new_tokens
    if longest > min(m.config.block_size for m in [teacher, *drafts.values()]):
        raise LessonError(f"a prompt plus --new-tokens {args.new_tokens} is longer than the "
                          f"models' context: use a smaller --new-tokens")
    s = data["settings"]
    settings = {"T=1": dict(temperature=1.0),
                "02's sampling": dict(temperature=s["temperature"], top_k=s["top_k"],
                                      top_p=s["top_p"])}
    print(f"teacher: {ckpt.get('source', '?')} | drafts: {', '.join(drafts)} | {len(prompts)} "
          f"test prompts x {args.new_tokens} new tokens | g in {gs} | {device}")

    # --- what each draft is worth, without sampling: sum_x min(p, q) on held-out positions ---
    overlap = {name: {k: held_out_overlap(teacher, d, test, test_P, v)
                      for k, v in settings.items()} for name, d in drafts.items()}

    # --- the cost of one step: plain sampling, batch 1, teacher and each draft, interleaved ---
    models = {"teacher": teacher, **drafts}
    steps = interleaved({name: lambda m=m: step_time(m, prompts, args.new_tokens, device)
                         for name, m in models.items()}, args.repeats)
    step = {name: median(t) for name, t in steps.items()}
    print(f"one decoding step (plain sampling, batch 1, median of {args.repeats}): " + ", ".join(
        f"{n} {1e3 * t:.2f} ms ({1e3 * steps[n][0]:.2f}-{1e3 * steps[n][-1]:.2f})"
        for n, t in step.items()))

    # --- speculative decoding: every draft, setting and g, on the same prompts; each timed in
    # turn with the teacher alone, the speedup of each turn against the teacher's in that turn ---
    rows = []
    for setting, kw in settings.items():
        runs, timers = {}, {"plain": lambda kw=kw: plain_speed(teacher, prompts, args.new_tokens,
                                                               kw, device)}
        for name, draft in drafts.items():
            for g in gs:
                def timer(name=name, draft=draft, g=g):  # the same seed: the same run each time
                    runs[name, g] = run(teacher, draft, prompts, args.new_tokens, g, kw)
                    return runs[name, g]["tok_s"]
                timers[name, g] = timer
        speeds = interleaved(timers, args.repeats, warm_up=False)  # (warm: timed above)
        for (name, g), r in runs.items():
            turns = sorted(t / p for t, p in zip(speeds[name, g], speeds["plain"]))
            c, a = step[name] / step["teacher"], r["acceptance"]
            r.update(setting=setting, draft=name, g=g, c=c, plain=median(speeds["plain"]),
                     speedup=median(turns), speedup_lo=turns[0], speedup_hi=turns[-1],
                     closed_form=(1 - a ** (g + 1)) / (1 - a) if a < 1 else g + 1.0,
                     held_out=overlap[name][setting])
            r["predicted"] = r["tokens_per_call"] / (g * c + 1)
            rows.append(r)
            print(line(r))

    # --- the report ---
    md = report(rows, steps, args, len(prompts), ckpt.get("source", "?"))
    save_artifact({"kind": "speculative", "preset": args.preset, "rows": rows,
                   "overlap": overlap, "step": step, "steps": steps}, f"{args.out}/speculative.pt")
    write_text("\n".join(md) + "\n", f"{args.out}/speculative.md")
    chart(rows, overlap, gs, f"{args.out}/speculative.png")
    print(f"wrote {args.out}/speculative.md, speculative.png, speculative.pt")


if __name__ == "__main__":
    run_lesson(main, oom="a smaller --new-tokens")
