"""Lesson 07's report: methods.md (the table, what the seeds let it claim, the rates, the compute)
and methods.png. A row is {"mean", "min", "max"}: a measurement's mean over seeds and its range.
docs/lab.md reads the table.
"""
import matplotlib.ticker

from common.plumbing.charts import plt, save_chart

REFERENCES = ("teacher", "start")  # the rows that are not methods
COLUMNS = {  # table column -> (the row's key, format, which way is better)
    "ppl on teacher text": ("ppl", "{:.2f}", "lower"),
    "KL(t‖s)": ("fkl", "{:.3f}", "lower"),
    "KL(s‖t)": ("rkl", "{:.3f}", "lower"),
    "acceptance": ("acceptance", "{:.3f}", "higher"),
    "teacher ppl of own text": ("teacher_ppl_own", "{:.2f}", "lower"),
    "distinct-2": ("distinct_2", "{:.3f}", "higher"),
}


def cell(row, key, fmt, spread):
    """A table cell: the mean over seeds, with the seeds' range (min-max) if there are several."""
    text = fmt.format(row["mean"][key])
    if spread:
        text += f" ({fmt.format(row['min'][key])}–{fmt.format(row['max'][key])})"
    return text


def verdicts(rows, seeds):
    """For each column: the best method by its mean, and whether the seeds separate it from every
    other: a difference is claimed only where the ranges (min-max over seeds) do not overlap."""
    methods = {n: r for n, r in rows.items() if n not in REFERENCES}
    if len(methods) < 2:
        return []
    lines = []
    for column, (key, fmt, better) in COLUMNS.items():
        sign = 1 if better == "lower" else -1
        order = sorted(methods, key=lambda n: sign * methods[n]["mean"][key])
        best = methods[order[0]]
        said = (f"- **{column}** ({better} is better): {order[0]} {cell(best, key, fmt, seeds > 1)}"
                f", then {order[1]} {cell(methods[order[1]], key, fmt, seeds > 1)}")
        if seeds < 2:
            lines.append(said + ": one seed, so no spread to tell a difference from noise.")
            continue
        tied = [n for n in order[1:] if methods[n]["min"][key] <= best["max"][key]
                and methods[n]["max"][key] >= best["min"][key]]  # the ranges overlap
        lines.append(said + (": apart from every other method over every seed." if not tied else
                             f": within the seeds' spread of {', '.join(tied)}; not a "
                             f"difference at {seeds} seeds."))
    return lines


def report_lines(lab, rows, compute):
    """methods.md: the setup (lab: 07's settings and what it measured on), the table, what it
    claims, the rates, the compute (docs/lab.md reads it)."""
    seeds, grid, seed = lab["seeds"], lab["lr_grid"], lab["first_seed"]
    first = next(r for n, r in rows.items() if n not in REFERENCES)
    spread = seeds > 1
    warm = lab["warm_epochs"]
    label = {"teacher": "teacher (reference)", "start": f"start ({warm} epochs of seq)"}
    md = ["# The divergence lab\n",
          f"Teacher: {lab['teacher']}. Every method starts from the same student (student_init.pt "
          f"after {warm} epochs of sequence-level KD) and trains {lab['steps']} optimizer steps "
          f"({lab['epochs']} epochs, 04's defaults for the {lab['preset']} preset otherwise), at "
          f"the learning rate its own objective chose on the val split from {{"
          f"{', '.join(f'{lr:g}' for lr in grid)}}}, with {seeds} seed(s) ("
          f"{', '.join(str(seed + i) for i in range(seeds))}: data order, dropout, the "
          f"student's sampling)." + (" Each cell: the mean over seeds (the seeds' min–max)." if
                                    spread else "") +
          f" Measured on the teacher's {lab['n_test']} held-out test samples (prompts not scored); "
          f"own text: {lab['own_samples']} continuations of each test prompt at temperature 1, "
          f"{first['runs'][0]['own_tokens']:,} tokens or fewer per model.\n",
          "| method | lr | " + " | ".join(COLUMNS) + " | FLOPs, student + teacher | time |",
          "|---|---:|" + "---:|" * (len(COLUMNS) + 2)]
    for name, r in rows.items():
        cells = [cell(r, key, fmt, spread and name not in REFERENCES)
                 for key, fmt, _ in COLUMNS.values()]
        flops = (f"{r['mean']['student_flops']:.2g} + {r['mean']['teacher_flops']:.2g}"
                 if "student_flops" in r["mean"] else "")
        time_ = f"{r['mean']['time']:.0f} s" if "time" in r["mean"] else ""
        lr = f"{r['lr']:g} | " if "lr" in r else "| "
        md.append(f"| {label.get(name, name)} | {lr}" + " | ".join(cells)
                  + f" | {flops} | {time_} |")
    md += ["", "What the table supports (a difference is claimed only where the seeds' ranges do "
           "not overlap; with 2 or 3 seeds even that is a weak test):", *verdicts(rows, seeds),
           "", "## The learning rate each method chose\n",
           f"Each method's own objective on the val split (lower is better), seed {seed}:\n",
           "| method | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | chosen |",
           "|---|" + "---:|" * (len(grid) + 1)]
    md += [f"| {name} | " + " | ".join(f"{r['grid'][lr]:.4f}" for lr in grid)
           + f" | {r['lr']:g} |" for name, r in rows.items() if "grid" in r]
    md += ["", "## Compute\n",
           f"FLOPs as Kaplan et al. (2020) count them (docs/lab.md): student N = "
           f"{compute['student_N']:,}, teacher N = {compute['teacher_N']:,}. Not in the table: the "
           f"start, {compute['start_flops']:.2g} FLOPs for every method alike, and 02's writing "
           f"of the data, {compute['writing']:.2g} FLOPs once. Time: wall time, sampling included.",
           "", "Each run is in methods/<method>/lr<rate>-seed<seed>/; rerun one by hand with the "
           "command 07 printed for it."]
    return md


def chart(rows, path):
    """Left: what each method traded (coverage of the teacher's text against how plausible its own
    text is to the teacher); right: what it bought for its compute (acceptance against the training
    FLOPs). Each method's point is its mean over seeds, the bars its range."""
    names = [n for n in rows if n not in REFERENCES]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    for name, r in rows.items():
        m, lo, hi = r["mean"], r["min"], r["max"]
        style = (dict(marker="*", ms=14, color="black") if name == "teacher" else
                 dict(marker="s", ms=7, color="#999999") if name == "start" else
                 dict(marker="o", ms=7, color=colors[name]))
        ax.errorbar(m["ppl"], m["teacher_ppl_own"], zorder=3, capsize=2, **style,
                    xerr=[[m["ppl"] - lo["ppl"]], [hi["ppl"] - m["ppl"]]],
                    yerr=[[m["teacher_ppl_own"] - lo["teacher_ppl_own"]],
                          [hi["teacher_ppl_own"] - m["teacher_ppl_own"]]])
        ax.annotate(name, (m["ppl"], m["teacher_ppl_own"]), xytext=(5, 4),
                    textcoords="offset points", fontsize=7)
        if name not in REFERENCES:
            flops = m["student_flops"] + m["teacher_flops"]
            bx.errorbar(flops, m["acceptance"], capsize=2, **style,
                        yerr=[[m["acceptance"] - lo["acceptance"]],
                              [hi["acceptance"] - m["acceptance"]]])
            bx.annotate(name, (flops, m["acceptance"]), xytext=(5, 4),
                        textcoords="offset points", fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 3, 4, 5 rather than 3x10^0
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain)
    ax.set_xlabel("student's perplexity on the teacher's text\n"
                  "(lower: covers what the teacher says)")
    ax.set_ylabel("teacher's perplexity on the student's own text\n"
                  "(lower: writes what the teacher would)")
    ax.set_title("What each method trades (lower left is better)\n(the mean over seeds; bars: "
                 "min-max)")
    ax.grid(alpha=0.3, which="both")
    bx.set_xscale("log")
    bx.set_xlabel("training FLOPs, student + teacher (the start and 02 not counted)")
    bx.set_ylabel("acceptance: mean sum min(p, q)\n(higher: a better draft for the teacher)")
    bx.set_title("What it bought for its compute (upper left is better)\n(the mean over seeds; "
                 "bars: min-max)")
    bx.grid(alpha=0.3, which="both")
    save_chart(fig, path)
