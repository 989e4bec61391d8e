"""Lesson 06: the comparison. Charts of perplexity, of training and of soft targets (the teacher's
next-token distribution at one position beside the student's, before and after), how much the
student improved and how close it came to the teacher, a spec table with generation speed measured
now, and the teacher's and the student's texts side by side for the same prompts, all gathered in
report.md. In a notebook the charts also appear under the cell.
  improvement = (student before - student after) / student before, in perplexity: how far it went
  achievement = teacher perplexity / student perplexity: 100% would be as good as the teacher
  gap closed  = (log ppl before - log ppl after) / (log ppl before - log ppl teacher): the share
                of the way from the untrained student to the teacher, in nats per token (the
                improvement is ~100% for any student that learned anything; this is not)

Reads:  artifacts/teacher.pt, student_init.pt, student.pt, train_log.pt, eval.pt, generated.pt
Writes: artifacts/perplexity.png, training.png, soft_targets.png, report.md
Run:    python 06_compare.py
"""
import math
import os
import time

import torch

from common import toy_language
from common.model import logits_fp32
from common.perplexity import sequences_nll
from common.plumbing.artifacts import load_artifact, load_model, run_lesson, write_text
from common.plumbing.charts import plt, save_chart
from common.plumbing.cli import lesson_parser, parse, positive_int
from common.plumbing.device import get_device, precision, sync
from common.sampling import generate
from common.tokenizer import EOT, get_tokenizer

# --- settings ---
PROMPTS = ["The history of science shows that", "In the small village by the sea,",
           "The best way to learn is"]
LABELS = {"teacher": "teacher", "student_init": "student (init)", "student": "student (trained)"}
COLORS = {"teacher": "#4c72b0", "student_init": "#bbbbbb", "student": "#dd8452"}


def perplexity_chart(ppl, floor, vocab_size, path):
    sets = list(ppl)
    fig, ax = plt.subplots(figsize=(3.6 + 2.4 * len(sets), 4.8))
    width = 0.26
    for i, name in enumerate(LABELS):
        xs = [j + (i - 1) * width for j in range(len(sets))]
        vals = [ppl[s][name] for s in sets]
        bars = ax.bar(xs, vals, width, label=LABELS[name], color=COLORS[name])
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.1f}",
                        (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
    ax.axhline(vocab_size, color="#999999", ls=":", lw=1, label=f"uniform guess ({vocab_size:,})")
    label = "floor: the toy language's own -log p on this set"
    for j, s in enumerate(sets):
        if s in floor:  # the language's entropy: no model can go below this line
            ax.hlines(floor[s], j - 0.42, j + 0.42, colors="black", linestyles="--", lw=1.2,
                      label=label)
            label = None  # one legend entry
    ax.set_yscale("log")
    ax.set_xticks(range(len(sets)), sets)
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title("Perplexity per evaluation set")
    top = max([v for row in ppl.values() for v in row.values()] + [vocab_size])
    ax.set_ylim(bottom=1, top=top * 6)  # room for the labels above the tallest bar
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=8, ncol=3, frameon=False)
    save_chart(fig, path)


def training_chart(log, teacher_ce, path):
    """The student's cross-entropy as it trains, the teacher's on the same val samples (the level a
    perfect imitation would reach), and the learning-rate schedule on a second axis."""
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    # cross-entropy on the teacher's sampled tokens, for train and val alike (under --kd soft the
    # training loss also holds the KL term; its cross-entropy part is what compares with val)
    ax.plot(log["step"], log.get("ce", log["loss"]), lw=1, color=COLORS["student"], alpha=0.8,
            label="train cross-entropy (per step)")
    vs, vl = zip(*log["val"])
    ax.plot(vs, vl, "o-", color=COLORS["student"], mec="black",
            label="val cross-entropy (per epoch)")
    ax.axhline(teacher_ce, color=COLORS["teacher"], ls="--", lw=1.2,
               label=f"teacher on the same val samples ({teacher_ce:.2f})")
    # a log scale: the untrained student's ~10.8 nats and the last epochs' ~1.4 both in view
    ax.set_yscale("log")
    values = [*vl, *log.get("ce", log["loss"]), teacher_ce]
    ax.set_ylim(min(values) * 0.9, max(values) * 1.1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats per sampled token, log scale)")
    ax.set_title(f"Training the student (--kd {log['settings']['kd']})")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()  # the learning rate, warmup then cosine decay
    lr_ax.plot(log["step"], log["lr"], color="#999999", lw=1, ls=":",
               label="learning rate (right axis)")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_ylim(0, max(log["lr"]) * 1.1)
    lines = ax.get_legend_handles_labels()
    more = lr_ax.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
    save_chart(fig, path)


@torch.no_grad()
def soft_targets(st, models, device):
    """02's soft targets (the teacher's top 10 next tokens at one position, at T = 1 and T = 2)
    with the student's probabilities for the same tokens at T = 1, before and after training."""
    if not st:  # a generated.pt from before soft targets were stored
        return None
    ctx = torch.tensor([st["context"]], device=device)
    out = dict(st)
    for name in ("student_init", "student"):
        probs = torch.softmax(logits_fp32(models[name], ctx)[0, -1], -1)  # (V,)
        out[name] = probs[st["ids"]].tolist()
    return out


def soft_targets_chart(soft, enc, path):
    """The teacher's soft targets at T = 1 and T = 2 beside the student's probabilities before
    and after training, for the teacher's 10 likeliest next tokens at one real position."""
    names = [enc.decode([i]) for i in soft["ids"]]
    series = [(soft["p_T1"], "teacher, T=1", COLORS["teacher"]),
              (soft["p_T"], f"teacher, T={soft['T']:g} (softened)", "#8fb0e0"),
              (soft["student_init"], "student before training, T=1", COLORS["student_init"]),
              (soft["student"], "student after training, T=1", COLORS["student"])]
    fig, ax = plt.subplots(figsize=(9, 4.4))
    width = 0.2
    for k, (vals, label, color) in enumerate(series):
        ax.bar([i + (k - 1.5) * width for i in range(len(names))], vals, width, label=label,
               color=color)
    ax.set_xticks(range(len(names)), [repr(n) for n in names], rotation=30, fontsize=8)
    ax.set_yscale("log")  # the untrained student's 0.00002 a token beside the teacher's 0.1
    ax.set_ylabel("probability of the next token (log scale)")
    ax.set_title(f"Soft targets after {enc.decode(soft['context'][1:])!r}: what the teacher "
                 f"teaches besides its top token")
    ax.legend(fontsize=8)
    save_chart(fig, path)


def soft_targets_lines(soft, enc):
    """report.md's soft-targets section: the table behind soft_targets.png."""
    L = ["## Soft targets", "",
         f"The teacher's ten likeliest next tokens after {enc.decode(soft['context'][1:])!r} "
         f"(02 picked the position), with the student's probabilities for them before and after "
         f"training. At T = {soft['T']:g} the teacher's distribution flattens: the small "
         "probabilities, which wrong answers are nearly right, are what soft-target KD passes on "
         "beyond the sampled token.", "",
         f"| token | teacher, T=1 | teacher, T={soft['T']:g} | student before | student after |",
         "|---|---:|---:|---:|---:|"]
    for k, i in enumerate(soft["ids"]):
        L.append(f"| {enc.decode([i])!r} | {soft['p_T1'][k]:.3f} | {soft['p_T'][k]:.3f} | "
                 f"{soft['student_init'][k]:.5f} | {soft['student'][k]:.3f} |")
    rest = [1 - sum(soft[key]) for key in ("p_T1", "p_T", "student_init", "student")]
    L.append("| every other token | " + " | ".join(f"{r:.3f}" for r in rest) + " |")
    return L + ["", "The last row is the mass on every other token: softening raises it (for the "
                 "tiny teacher, most of it lands on the 50,063 tokens the toy language never uses, "
                 "whose logits are all 0 since their embeddings are zero).", "",
                 "![soft targets](soft_targets.png)", ""]


@torch.no_grad()
def tokens_per_second(model, device, n_new=48, batch=1, runs=5):
    """Generation speed with the KV cache, measured now: the median of `runs` timed runs after a
    warm-up (one run on a busy machine can be off by 2x)."""
    idx = torch.full((batch, 1), EOT, device=device)
    generate(model, idx, 4, top_k=50)
    rates = []
    for _ in range(runs):
        sync(device)
        t0 = time.time()
        g = torch.Generator(device=device).manual_seed(0)
        generate(model, idx, n_new, top_k=50, generator=g)
        sync(device)
        rates.append(batch * n_new / (time.time() - t0))
    return sorted(rates)[len(rates) // 2]


def gap_closed(r):
    """The share of the log-perplexity gap between the untrained student and the teacher that
    training closed: 0 for no progress, 1 for the teacher's level (above 1: better than it)."""
    before, after, teacher = (math.log(r[k]) for k in ("student_init", "student", "teacher"))
    return (before - after) / (before - teacher)


def perplexity_lines(ev, log, rates):
    """report.md's head: what was trained, the perplexities with their rates, agreement and KL."""
    ppl, st, floor = ev["perplexity"], log["settings"], ev.get("floor", {})
    L = ["# Distillation report", "",
         f"Teacher: {ev.get('teacher_source') or 'see teacher.pt'}.", ""]
    L += [f"Student trained with {st['kd']} KD, {st['epochs']} epochs, {log['tokens']:,} sampled "
          f"tokens seen, {log['wall_time']:.0f}s of training (all parts of a resumed run) on "
          f"{log.get('world', 1)} process(es), {log['dtype']}. Perplexity window "
          f"{ev.get('window')}, stride {ev.get('stride')}.", ""]
    L += ["## Perplexity", "",
          "| set | teacher | student (init) | student (trained) | improvement | achievement | "
          "gap closed |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for set_name, r in ppl.items():
        L.append(f"| {set_name} | {r['teacher']:,.2f} | {r['student_init']:,.2f} | "
                 f"{r['student']:,.2f} | {rates[set_name]['improvement']:.1%} | "
                 f"{rates[set_name]['achievement']:.1%} | {rates[set_name]['gap_closed']:.1%} |")
    L += ["", "improvement = (student init − student) / student init; achievement = teacher ppl / "
          "student ppl (100% = as good as the teacher); gap closed = (log student init − log "
          "student) / (log student init − log teacher), the share of the way to the teacher in "
          "nats per token (improvement is ~100% for any student that learned anything; the gap "
          "closed says how far it got).", ""]
    for set_name, f in floor.items():
        L += [f"{set_name}: documents written by the toy language itself (the offline stand-in for "
              f"WikiText-2). Its floor, exp of the language's own -log p per token on these "
              f"documents, is {f:.2f}: what a model knowing the language exactly would score (no "
              f"model beats it in expectation; the language's entropy rate, over 2,000 "
              f"documents, is {math.exp(toy_language.ENTROPY_RATE):.2f}). The teacher is at "
              f"{ppl[set_name]['teacher'] / f:.2f}x the floor, the student at "
              f"{ppl[set_name]['student'] / f:.2f}x.", ""]
    if "generated-test" in ppl:
        L += ["generated-test is the teacher's held-out samples (openings never used in training), "
              "scored on the tokens the teacher sampled, not on its prompts. The teacher's own "
              "perplexity there is low partly by construction: it chose those tokens with "
              f"{ev.get('sampling', 'its sampling settings')}, which favour the tokens it finds "
              "likely. Human-written text (wikitext2) is the fair comparison of the teacher with "
              "anything else" + (" (here toy-language)." if floor else "."), ""]
    for set_name, why in ev.get("skipped", {}).items():
        L.append(f"Not evaluated: {set_name} ({why}).")
    L += ["", "![perplexity](perplexity.png)", ""]
    if ev.get("agreement"):
        L += ["On the teacher's held-out test samples (sampled tokens only):", "",
              "| model | top-1 agreement with teacher | top-K truncated KL(teacher ‖ model) |",
              "|---|---:|---:|"]
        L += [f"| {LABELS[n]} | {ev['agreement'][n]:.1%} | {ev['kl'][n]:.4f} |"
              for n in ev["agreement"]]
        L += ["", "The truncated KL compares each model with the teacher's stored top K, "
              "renormalised (what --kd soft trains on); it is not the KL to the teacher's whole "
              "distribution: the teacher's own row is not 0 but the cost of keeping only its top "
              "K.", ""]
    return L


def training_lines(log, teacher_ce, spec, compression, seed, pairs):
    """report.md's rest: training, the two models side by side in numbers, then in text."""
    L = ["## Training", "", "![training](training.png)", "",
          f"The teacher's cross-entropy on the same val samples (sampled tokens only): "
          f"{teacher_ce:.4f} nats per token, the level a perfect imitation would reach; the "
          f"student's best: {log['best_val']:.4f}.", ""]
    L += ["## The two models", "", "| | teacher | student |", "|---|---:|---:|"]
    L += [f"| {a.strip()} | {b} | {c} |" for a, b, c in spec]
    L += [f"| compression | | {compression:.1f}x fewer parameters |", ""]
    L += ["## Side by side", "",
          f"Same prompt, same seed ({seed}), temperature 0.9, top-k 50, top-p 0.95.", ""]
    for prompt, row in pairs:
        L += [f"**{prompt}**", "", f"- teacher: {prompt} {row['teacher']}",
              f"- student: {prompt} {row['student']}", ""]
    return L


def main():
    p = lesson_parser(__doc__)
    p.add_argument("--max-new-tokens", type=positive_int, default=48,
                   help="length of the side-by-side samples")
    p.add_argument("--seed", type=int, default=1337, help="seed for the side-by-side samples")
    args = parse(p)
    out = args.out
    enc = get_tokenizer()
    prec = precision(get_device())  # the device and the precision, decided once
    device = prec.device
    models, files = {}, {}
    for name in LABELS:
        files[name] = f"{out}/{name}.pt"
        kinds = ("student_init", "teacher") if name == "student_init" else name  # as 05
        models[name], _ = load_model(files[name], kinds, vocab_size=enc.n_vocab)
        models[name].to(device)
    log = load_artifact(f"{out}/train_log.pt", "train_log",
                        keys=("step", "loss", "val", "lr", "settings"))
    data = load_artifact(f"{out}/generated.pt", "generated", keys=("val", "val_prompt_lens"))
    ev = load_artifact(f"{out}/eval.pt", "eval", keys=("perplexity",))
    ppl = ev["perplexity"]

    # --- charts ---
    floor = ev.get("floor", {})
    perplexity_chart(ppl, floor, models["teacher"].config.vocab_size, f"{out}/perplexity.png")
    with prec.autocast():  # the teacher's level on the val samples of 04
        nll, n = sequences_nll(models["teacher"], data["val"], prompt_lens=data["val_prompt_lens"])
    teacher_ce = nll / n
    training_chart(log, teacher_ce, f"{out}/training.png")
    soft = soft_targets(data.get("soft_targets"), models, device)
    if soft:
        soft_targets_chart(soft, enc, f"{out}/soft_targets.png")

    # --- improvement, achievement and the share of the gap to the teacher closed (see above) ---
    rates = {s: {"improvement": (r["student_init"] - r["student"]) / r["student_init"],
                 "achievement": r["teacher"] / r["student"], "gap_closed": gap_closed(r)}
             for s, r in ppl.items()}

    # --- spec table, with generation speed measured now ---
    t, s = models["teacher"], models["student"]
    speed = {name: tokens_per_second(models[name], device) for name in ("teacher", "student")}
    mb = {name: f"{os.path.getsize(files[name]) / 1e6:.1f} MB" for name in ("teacher", "student")}
    spec = [("parameters", f"{t.num_params() / 1e6:.1f}M", f"{s.num_params() / 1e6:.1f}M"),
            ("  without embeddings", f"{t.num_params(False) / 1e6:.2f}M",
             f"{s.num_params(False) / 1e6:.2f}M"),
            ("layers / width / heads", *(f"{m.config.n_layer} / {m.config.n_embd} / "
                                         f"{m.config.n_head}" for m in (t, s))),
            ("checkpoint on disk (fp32)", mb["teacher"], mb["student"]),
            (f"generation, batch 1 ({device}, median of 5)", f"{speed['teacher']:,.0f} tok/s",
             f"{speed['student']:,.0f} tok/s")]
    compression = t.num_params() / s.num_params()

    # --- side by side: same prompts, same seed ---
    pairs = []
    for prompt in PROMPTS:
        idx = torch.tensor([[EOT] + enc.encode(prompt)], device=device)
        row = {}
        for name in ("teacher", "student"):
            g = torch.Generator(device=device).manual_seed(args.seed)
            ids = generate(models[name], idx, args.max_new_tokens, temperature=0.9, top_k=50,
                           top_p=0.95, eos_token=EOT, generator=g)[0, idx.size(1):].tolist()
            row[name] = enc.decode([i for i in ids if i != EOT]).strip()
        pairs.append((prompt, row))

    # --- report.md ---
    report = (perplexity_lines(ev, log, rates)
              + training_lines(log, teacher_ce, spec, compression, args.seed, pairs))
    if soft:
        report += soft_targets_lines(soft, enc)
    write_text("\n".join(report), f"{out}/report.md")

    # --- summary ---
    for set_name, r in ppl.items():
        print(f"{set_name:<16} ppl teacher {r['teacher']:,.2f} | student {r['student_init']:,.2f} "
              f"-> {r['student']:,.2f} | improvement {rates[set_name]['improvement']:.1%} | "
              f"achievement {rates[set_name]['achievement']:.1%} | gap closed "
              f"{rates[set_name]['gap_closed']:.1%}")
    print(f"compression {compression:.1f}x | generation {speed['teacher']:,.0f} vs "
          f"{speed['student']:,.0f} tok/s (teacher vs student, {device})")
    print(f"wrote {out}/perplexity.png, {out}/training.png, "
          + (f"{out}/soft_targets.png, " if soft else "") + f"{out}/report.md")


if __name__ == "__main__":
    run_lesson(main, oom="a smaller --max-new-tokens")
