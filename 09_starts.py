"""Lesson 09: where should the student start? The same recipe of 04 from three starts that 03 makes:
random weights (the original course), every other block of the teacher (DistilGPT2, --from-teacher)
and the student's shape cut out of the teacher by importance (Minitron, --prune); over --seeds, each
measured before and after training on the teacher's held-out samples (perplexity, acceptance
1 - TVD) and, for the tiny teacher, on held-out toy-language documents beside the language's floor.
Each run is lessons 03 and 04 themselves, commands 09 prints, in its own folder. docs/starts.md
reads the table.

Reads:  artifacts/teacher.pt, generated.pt
Writes: artifacts/starts/<start>/seed<seed>/ (03's student_init.pt, 04's run), starts.pt,
        starts.md, starts.png
Run:    python 09_starts.py          (add --preset tiny for a CPU run of about seven minutes; a
        second run keeps the runs already trained)
"""
import math
import time

import torch
from torch.nn import functional as F

from common import toy_language
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
from common.plumbing.cli import lesson_parser, names_among, parse, positive_float, positive_int
from common.plumbing.device import get_device, precision
from common.plumbing.runs import train
from common.tokenizer import EOT, get_tokenizer

# --- settings (flags left unset take the preset's values) ---
STARTS = {"random": [], "every other block": ["--from-teacher"], "pruned": ["--prune"]}  # 03's
# The tiny student is cut to 1 block (of the tiny teacher's 2) so that pruning cuts depth and width
PRESETS = {"gpt2": dict(n_layer=6, seeds=3), "tiny": dict(n_layer=1, seeds=3)}
SEED = 1337              # 03's and 04's default; further seeds count up from it
TOY_DOCUMENTS, TOY_SEED = 60, 3  # lesson 05's held-out toy-language documents
INPUTS = ["teacher.pt", "generated.pt"]


def get_args():
    p = lesson_parser(__doc__)
    p.add_argument("--n-layer", type=positive_int,
                   help="the student's blocks (03's --n-layer; --from-teacher takes half the "
                        "teacher's) (gpt2: 6, tiny: 1)")
    p.add_argument("--seeds", type=positive_int,
                   help="runs per start, seeds 1337, 1338, ... for 03 and 04 (gpt2: 3, tiny: 3)")
    p.add_argument("--epochs", type=positive_int, help="04's --epochs (default: 04's preset)")
    p.add_argument("--lr", type=positive_float, help="04's --lr, for every start (default: 04's)")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="sequences per batch when measuring")
    p.add_argument("--starts", default=",".join(STARTS),
                   help=f"the starts to run, comma-separated (default: all: {','.join(STARTS)})")
    p.add_argument("--fresh", action="store_true", help="run every start again")
    return parse(p, PRESETS)


# --- measuring: the teacher's held-out samples, and the toy language ---
def held_out(model, teacher, seqs, prompt_lens, batch_size):
    """On the sampled tokens of the teacher's samples: the model's perplexity and (given a teacher)
    its acceptance, the mean sum_x min(p, q) = 1 - TVD (a speculative draft's chance, as in 07)."""
    def measure(y, logits, *teacher_logits):  # (2, n): the NLL, and the acceptance or 0
        log_q = F.log_softmax(logits, -1)
        nll = -log_q.gather(-1, y[:, None])[:, 0]
        agreed = (acceptance(F.softmax(teacher_logits[0], -1), log_q.exp()) if teacher_logits
                  else torch.zeros_like(nll))
        return torch.stack([nll, agreed])
    models = [model] if teacher is None else [model, teacher]
    sums, counts = score_sampled(models, seqs, prompt_lens, measure, batch_size)
    nll, acc = (sums.sum(1) / counts.sum()).tolist()
    return {"ppl": math.exp(nll), "acceptance": acc}


def measure(model, teacher, data, toy, args, prec):
    """A model's numbers: held_out's, the toy language's perplexity (tiny teacher), parameters."""
    with prec.autocast():
        r = held_out(model.to(prec.device), teacher, data["test"], data["test_prompt_lens"],
                     args.batch_size)
        if toy:  # every token after the opening <|endoftext|> scored, as in 05
            r["toy_ppl"] = held_out(model, None, toy, [1] * len(toy), args.batch_size)["ppl"]
    return {**r, "params": model.num_params()}


# --- training: 03 makes the start, 04 trains it, one folder per start and seed ---
def run_start(args, name, seed):
    """Make (03) and train (04) one start at one seed, or keep it if trained with the same flags;
    returns its folder and train_log."""
    sub = f"{args.out}/starts/{name.replace(' ', '_')}/seed{seed}" + (f"-lr{args.lr:g}"
                                                                        if args.lr else "")
    common = ["--preset", args.preset, "--out", sub, "--seed", str(seed)]
    make = common + ["--n-layer", str(args.n_layer), *STARTS[name]]
    flags = common + (["--epochs", str(args.epochs)] if args.epochs else []) + (
        ["--lr", f"{args.lr:g}"] if args.lr else [])
    return sub, train(f"{name}, seed {seed}", sub, flags, args.out, None, args.fresh, INPUTS, make)


def summary(runs):
    """{key: (mean, min, max)} over the seeds' runs."""
    return {k: (sum(r[k] for r in runs) / len(runs), min(r[k] for r in runs),
                max(r[k] for r in runs)) for k in runs[0]}


def cell(stat, fmt, spread):
    mean, lo, hi = stat
    return fmt.format(mean) + (f" ({fmt.format(lo)}–{fmt.format(hi)})" if spread else "")


def report(rows, teacher_row, floor, args, steps, n_test):
    """starts.md: one row per start, before and after 04, mean (min–max) over seeds."""
    spread = args.seeds > 1
    toy = floor is not None
    head = ["start", "parameters", "ppl on teacher text: before", "after"]
    head += ["toy-language ppl: before", "after"] if toy else []
    head += ["acceptance: before", "after"]
    md = ["# Three starts for one student\n",
          f"Each start trained by `04_train.py --preset {args.preset}"
          + (f" --lr {args.lr:g}" if args.lr else "") + "` with the same recipe "
          f"({steps} optimizer steps), seeds {SEED}–{SEED + args.seeds - 1} (03's init and 04's "
          f"data order); each cell the mean over seeds" + (" (min–max)." if spread else ".")
          + f" Measured on the teacher's {n_test} held-out test samples (sampled tokens only)"
          + (f" and {TOY_DOCUMENTS} held-out toy-language documents (floor: the language's own "
             f"perplexity, {floor:.2f})." if toy else "."), "",
          "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    t = teacher_row
    md.append(f"| teacher | {t['params'] / 1e6:.2f}M | {t['ppl']:.2f} | | "
              + (f"{t['toy_ppl']:.2f} | | " if toy else "") + "1 | |")
    for name, r in rows.items():
        b, a = r["before"], r["after"]
        cells = [f"{b['params'][0] / 1e6:.2f}M", cell(b["ppl"], "{:,.2f}", spread),
                 cell(a["ppl"], "{:.2f}", spread)]
        if toy:
            cells += [cell(b["toy_ppl"], "{:,.2f}", spread), cell(a["toy_ppl"], "{:.2f}", spread)]
        cells += [cell(b["acceptance"], "{:.3f}", spread), cell(a["acceptance"], "{:.3f}", spread)]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    return md


def chart(rows, teacher_row, path):
    """Perplexity on the teacher's text before and after 04 (left), acceptance after (right):
    each start's mean over seeds, the bars its range."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = range(len(rows))
    names = [f"{n}\n{r['before']['params'][0] / 1e6:.2f}M parameters" for n, r in rows.items()]
    for k, (when, color) in enumerate((("before", "#999999"), ("after", "tab:blue"))):
        m = [r[when]["ppl"] for r in rows.values()]
        ax.bar([i + 0.4 * k for i in x], [v[0] for v in m], 0.4, color=color, label=when,
               yerr=[[v[0] - v[1] for v in m], [v[2] - v[0] for v in m]], capsize=3)
    ax.axhline(teacher_row["ppl"], color="black", ls="--", lw=1, label="teacher")
    ax.set_yscale("log")
    ax.set_xticks([i + 0.2 for i in x], names)
    ax.set_ylabel("perplexity on the teacher's held-out text")
    ax.set_title("Before and after the same training\n(bars: the mean over seeds; whiskers: "
                 "min-max)")
    ax.legend()
    a = [r["after"]["acceptance"] for r in rows.values()]
    bx.bar(list(x), [v[0] for v in a], 0.5, color="tab:green", capsize=3,
           yerr=[[v[0] - v[1] for v in a], [v[2] - v[0] for v in a]])
    bx.set_xticks(list(x), names)
    bx.set_ylabel("acceptance, 1 - TVD (higher: a better draft)")
    bx.set_ylim(0, 1)
    bx.set_title("After training\n(bars: the mean over seeds; whiskers: min-max)")
    save_chart(fig, path)


def main():
    args = get_args()
    out = args.out
    chosen = names_among(args.starts, STARTS, "start")
    enc = get_tokenizer()
    for file in INPUTS:  # checked here once: a problem is one line, not many failed runs
        check_preset(load_artifact(f"{out}/{file}", file[:-3]), f"{out}/{file}", args.preset)
    data = load_artifact(f"{out}/generated.pt", "generated", keys=("test", "test_prompt_lens"))
    teacher, ckpt = load_model(f"{out}/teacher.pt", "teacher", vocab_size=enc.n_vocab)
    if args.n_layer > teacher.config.n_layer:
        raise LessonError(f"--n-layer {args.n_layer}: the teacher has only "
                          f"{teacher.config.n_layer} blocks to cut from")
    prec = precision(get_device())  # the device and the precision, decided once

    # --- every start at every seed: 03, then 04 (each run has the GPU to itself) ---
    t0 = time.time()
    folders = {name: [run_start(args, name, SEED + i) for i in range(args.seeds)]
               for name in chosen}
    teacher.to(prec.device)

    # --- measuring: before (student_init.pt) and after (student.pt, 04's best on val) ---
    toy, floor = None, None
    if ckpt.get("language") == "toy":
        docs = toy_language.documents(TOY_DOCUMENTS, TOY_SEED)
        floor = math.exp(toy_language.entropy_per_token(docs, enc.encode))
        toy = [torch.tensor([EOT] + enc.encode(d) + [EOT]) for d in docs]
    print(f"\nmeasuring on generated-test ({len(data['test'])} samples)"
          + (f" and {len(toy)} toy-language documents (floor {floor:.2f})" if toy else ""))
    teacher_row = measure(teacher, teacher, data, toy, args, prec)
    rows, steps = {}, set()
    for name, subs in folders.items():
        runs = {"before": [], "after": []}
        for seed, (sub, log) in enumerate(subs, SEED):
            for when, file, kind in (("before", "student_init.pt", "student_init"),
                                     ("after", "student.pt", "student")):
                model = load_model(f"{sub}/{file}", kind)[0]
                runs[when].append(measure(model, teacher, data, toy, args, prec))
            steps.add(log["step"][-1])
            b, a = runs["before"][-1], runs["after"][-1]
            print(f"  {name:<18} seed {seed} | {b['params'] / 1e6:.2f}M | ppl {b['ppl']:,.2f} -> "
                  f"{a['ppl']:.2f} | acceptance {b['acceptance']:.3f} -> {a['acceptance']:.3f}"
                  + (f" | toy ppl {b['toy_ppl']:,.2f} -> {a['toy_ppl']:.2f}" if toy else ""))
        rows[name] = {when: summary(r) for when, r in runs.items()}
    if len(steps) > 1:
        raise LessonError(f"the runs trained for different numbers of steps ({sorted(steps)}): "
                          f"run 09 with --fresh")

    # --- the report ---
    md = report(rows, teacher_row, floor, args, steps.pop(), len(data["test"]))
    write_text("\n".join(md) + "\n", f"{out}/starts.md")
    save_artifact({"kind": "starts", "preset": args.preset, "rows": rows, "teacher": teacher_row,
                   "floor": floor, "seeds": args.seeds}, f"{out}/starts.pt")
    chart(rows, teacher_row, f"{out}/starts.png")
    print("\n" + "\n".join(md[3:]))
    print(f"\nstarts finished in {time.time() - t0:.0f}s | wrote {out}/starts.md, starts.png, "
          f"starts.pt")


if __name__ == "__main__":
    run_lesson(main, oom="a smaller --batch-size (sequences measured at once)")
