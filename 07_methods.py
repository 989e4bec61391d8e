"""Lesson 07: the divergence lab. One teacher, one data set, one starting student and the same
number of optimizer steps, trained nine ways (METHODS below), each at the learning rate its own
objective picks on val from --lr-grid, then over --seeds; every student measured alike on the
teacher's held-out samples: perplexity, the exact KL both ways, acceptance (1 - TVD, the chance a
teacher keeps its speculative-decoding draft), the teacher's perplexity of the student's own text,
distinct-2, and training FLOPs. Each run is lesson 04 itself, a command 07 prints, in its own
folder. docs/lab.md explains the methods, the fair budget, the columns and the measured table.

Reads:  artifacts/teacher.pt, generated.pt, student_init.pt
Writes: artifacts/methods/start/, methods/<method>/lr<rate>-seed<seed>/ (each 04 run),
        methods.pt, methods.md, methods.png
Run:    python 07_methods.py          (add --preset tiny for a CPU run of about ten minutes; a
        second run keeps the runs already trained and resumes an interrupted one)
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import matplotlib
import matplotlib.ticker
import torch
from torch.nn import functional as F

from common.distill import (
    KD,
    ONLINE,
    loss_sums,
    make_batch,
    rest_bucket_kl,
    soft_kd_kl,
    token_divergence,
)
from common.model import logits_fp32
from common.plumbing.artifacts import (
    LessonError,
    check_preset,
    load_artifact,
    load_model,
    run_lesson,
    save_artifact,
    write_text,
)
from common.plumbing.cli import in_notebook, lesson_parser, parse, positive_floats, positive_int
from common.plumbing.device import autocast, get_device, pick_dtype
from common.sampling import continue_each
from common.tokenizer import EOT, get_tokenizer

if not in_notebook():
    matplotlib.use("Agg")  # from a shell: draw straight to a file
import matplotlib.pyplot as plt  # noqa: E402

# --- settings ---
# name -> the flags 04 gets (besides --preset, --out, --epochs, --init, --lr and --seed)
METHODS = {  # name: 04's flags
    "seq": ["--kd", "seq"],  # cross-entropy on the teacher's samples (Kim & Rush, 2016)
    "soft": ["--kd", "soft"],  # + its stored top 32 at T=2, renormalised (Hinton et al., 2015)
    # the same 32, the rest of the vocabulary as one bucket, at T=1 (TRL's loss_add_tail)
    "soft (rest bucket)": ["--kd", "soft", "--soft-tail", "rest", "--kd-temperature", "1"],
    "fkl": ["--kd", "fkl"],  # KL(teacher || student), full vocabulary, on the teacher's text
    "rkl": ["--kd", "rkl"],  # KL(student || teacher): token-level, not MiniLLM (no sampling)
    "tvd": ["--kd", "tvd"],  # (1/2) sum |p - q|: 1 - TVD is the acceptance (DistillSpec)
    # GKD (Agarwal et al., 2024): generalized JSD, half the batches written by the student
    "jsd+on-policy 0.5": ["--kd", "jsd", "--jsd-beta", "0.5", "--on-policy", "0.5"],
    "rkl+on-policy 1": ["--kd", "rkl", "--on-policy", "1"],  # exact reverse KL, the student's text
    # the same in expectation from one sampled token a position (MiniLLM's family; on-policy
    # distillation as Thinking Machines and Qwen3 use it, 2025): one teacher log-prob a token
    "rkl-sampled+on-policy 1": ["--kd", "rkl-sampled", "--on-policy", "1"],
}
# The budget: epochs of sequence-level KD for the start (from student_init.pt, at 04's from-scratch
# rate), then the same epochs for every method at a fine-tuning rate from the grid; the seeds.
PRESETS = {"gpt2": dict(warm_epochs=3, epochs=1, lr_grid=[1e-4, 3e-4, 1e-3], seeds=1,
                        own_samples=4),
           "tiny": dict(warm_epochs=6, epochs=1, lr_grid=[1e-3, 3e-3, 1e-2], seeds=3,
                        own_samples=2)}
SEED = 1337                 # 04's default: the grid runs use it, further seeds count up from it
TOPK = (1, 8, 32, 128)      # cache sizes for the price-of-top-K table
SAMPLE_SEED = 1234          # every model writes its own text with the same seeded generator
HERE = os.path.dirname(os.path.abspath(globals().get("__file__", "04_train.py")))
LESSON_04 = os.path.join(HERE, "04_train.py")
COLUMNS = {  # table column -> (the row's key, format, which way is better)
    "ppl on teacher text": ("ppl", "{:.2f}", "lower"),
    "KL(t‖s)": ("fkl", "{:.3f}", "lower"),
    "KL(s‖t)": ("rkl", "{:.3f}", "lower"),
    "acceptance": ("acceptance", "{:.3f}", "higher"),
    "teacher ppl of own text": ("teacher_ppl_own", "{:.2f}", "lower"),
    "distinct-2": ("distinct_2", "{:.3f}", "higher"),
}


def run_04(flags):
    """Run lesson 04 with these flags, its output shown here line by line. It runs in its own
    process group, so a Ctrl-C reaches it once, from us: it then finishes its step, saves, and
    stops."""
    proc = subprocess.Popen([sys.executable, "-u", LESSON_04, *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            print("    " + line, end="")
            lines.append(line)
        return proc.wait(), lines
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        for line in proc.stdout:  # let it save, and show what it says
            print("    " + line, end="")
        proc.wait()
        raise


def batches(seqs, prompt_lens, batch_size, device):
    """(x, y) batches of the sequences, prompts not scored."""
    for i in range(0, len(seqs), batch_size):
        yield make_batch(seqs[i:i + batch_size], device=device,
                         prompt_lens=prompt_lens[i:i + batch_size])


# --- measuring ---
@torch.no_grad()
def held_out_scores(student, teacher, seqs, prompt_lens, batch_size, device, dtype):
    """On the teacher's held-out samples, at every sampled position: the student's NLL of the
    teacher's token, the exact forward and reverse KL between the full distributions, and the
    acceptance sum_x min(p, q) = 1 - TVD. Returns per-sample sums (4, samples) and the scored
    tokens per sample."""
    sums, counts = [], []
    for x, y in batches(seqs, prompt_lens, batch_size, device):
        scored = y != -100
        with autocast(device, dtype):  # (n, V) each, at the n scored positions only
            s, t = logits_fp32(student, x, scored), logits_fp32(teacher, x, scored)
        # token_divergence's formulas, from one log-softmax of each side (a test checks them)
        log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)
        q, p = log_q.exp(), log_p.exp()
        nll = -log_q.gather(-1, y[scored][:, None])[:, 0]      # -log q(teacher's token)
        fkl = (p * (log_p - log_q)).sum(-1)                   # KL(p || q)
        rkl = (q * (log_q - log_p)).sum(-1)                   # KL(q || p)
        acceptance = torch.minimum(p, q).sum(-1)              # sum_x min(p, q) = 1 - TVD
        row = scored.nonzero()[:, 0]                          # each position's sample
        per_sample = torch.zeros(4, x.size(0), device=s.device).index_add_(
            1, row, torch.stack([nll, fkl, rkl, acceptance]))
        sums.append(per_sample.double().cpu())                # (4, B)
        counts.append(scored.sum(-1).cpu())
    return torch.cat(sums, 1), torch.cat(counts)


@torch.no_grad()
def sample_nll(model, seqs, prompt_lens, batch_size, device, dtype):
    """The model's NLL of each sequence's sampled tokens (prompt not scored): per-sample sums and
    counts."""
    sums, counts = [], []
    for x, y in batches(seqs, prompt_lens, batch_size, device):
        scored = y != -100
        with autocast(device, dtype):
            logits = logits_fp32(model, x, scored)  # (n, V): the scored positions only
        nll = F.cross_entropy(logits, y[scored], reduction="none")
        sums.append(torch.zeros(x.size(0), device=nll.device).index_add_(
            0, scored.nonzero()[:, 0], nll).double().cpu())
        counts.append(scored.sum(-1).cpu())
    return torch.cat(sums), torch.cat(counts)


def mean_and_spread(sums, counts):
    """The token-weighted mean of per-sample sums, and two standard errors of it, with the samples
    as the independent units (tokens of one sample are not independent): the ratio estimator's
    error."""
    n = counts.double()
    mean = sums.sum() / n.sum()
    k = len(n)
    se = ((sums - mean * n).pow(2).sum() * k / max(1, k - 1)).sqrt() / n.sum()
    return mean.item(), 2 * se.item()


def own_text(model, seqs, prompt_lens, device, per_prompt, seed=SAMPLE_SEED):
    """The model continues each prompt itself, per_prompt times, as many tokens as the teacher's
    sample has (fewer if it ends the text), at temperature 1, untruncated (its real
    distribution), with the same seeded generator for every model."""
    g = torch.Generator(device=device).manual_seed(seed)
    seqs = [s for s in seqs for _ in range(per_prompt)]
    prompt_lens = [P for P in prompt_lens for _ in range(per_prompt)]
    out = []
    for i in range(0, len(seqs), 64):
        group, P = seqs[i:i + 64], prompt_lens[i:i + 64]
        out += continue_each(model, [s[:p] for s, p in zip(group, P)],
                             [len(s) - p for s, p in zip(group, P)], EOT, temperature=1.0,
                             generator=g)
    return out, prompt_lens


def distinct_2(seqs, prompt_lens):
    """Distinct token pairs over all pairs, in the sampled part of each text (1.0: none repeats)."""
    pairs = [tuple(s[j:j + 2].tolist()) for s, P in zip(seqs, prompt_lens)
             for j in range(P, len(s) - 1)]
    return len(set(pairs)) / max(1, len(pairs))


def measure(student, teacher, test, test_P, args, device, dtype):
    """Every number of a table row for one model. The teacher's perplexity of the model's own text
    comes with its spread within this model's texts (+-x%: two standard errors)."""
    sums, counts = held_out_scores(student, teacher, test, test_P, args.batch_size, device, dtype)
    nll, fkl, rkl, acc = (sums.sum(1) / counts.sum()).tolist()  # means over every scored token
    text, P = own_text(student, test, test_P, device, args.own_samples)
    own, own_2se = mean_and_spread(*sample_nll(teacher, text, P, args.batch_size, device, dtype))
    return {"ppl": math.exp(nll), "fkl": fkl, "rkl": rkl, "acceptance": acc,
            "teacher_ppl_own": math.exp(own), "own_spread": math.exp(own_2se) - 1,
            "distinct_2": distinct_2(text, P),
            "own_tokens": sum(len(t) - p for t, p in zip(text, P))}


def options(flags):
    """04's flags of a method as a dict: {"--kd": "jsd", "--on-policy": "0.5", ...}."""
    return dict(zip(flags[::2], flags[1::2]))


@torch.no_grad()
def val_objective(flags, student, teacher, data, args, device, dtype):
    """The method's own loss on the val split, for choosing its learning rate: what it trains on
    (its divergence, or its KD loss), on the text it trains on (the teacher's val samples, the
    student's own continuations of the val prompts, or both in its --on-policy share). rkl-sampled
    is scored by the exact reverse KL, of which its loss is an estimate. Lower is better."""
    o = options(flags)
    share = float(o.get("--on-policy", 0))
    kd = KD("rkl" if o["--kd"] == "rkl-sampled" else o["--kd"],  # the loss 04 trains on, exactly
            float(o.get("--kd-alpha", 0.5)), float(o.get("--kd-temperature", 2.0)),
            float(o.get("--jsd-beta", 0.5)), o.get("--soft-tail", "renorm"))
    val, P = data["val"], data["val_prompt_lens"]
    own, _ = own_text(student, val, P, device, 1, seed=SAMPLE_SEED + 1) if share else (None, None)
    total = 0.0
    for text, weight in ((val, 1 - share), (own, share)):
        if not weight:
            continue
        loss, n = 0.0, 0
        for i, (x, y) in enumerate(batches(text, P, args.batch_size, device)):
            scored = y != -100
            with autocast(device, dtype):  # (n, V): the scored positions only
                s = logits_fp32(student, x, scored)
                t = logits_fp32(teacher, x, scored) if kd.kind in ONLINE else None
            topk = None
            if kd.kind == "soft":
                rows = slice(i * args.batch_size, (i + 1) * args.batch_size)
                _, _, ids, lps = make_batch(text[rows], data["val_topk_ids"][rows],
                                            data["val_topk_logprobs"][rows], device=device)
                topk = (ids[scored], lps[scored])
            loss += loss_sums(s, y[scored], kd, topk, t)[0].item()  # common/distill.py, as in 04
            n += int(scored.sum())
        total += weight * loss / n
    return total


@torch.no_grad()
def price_of_top_k(student, teacher, seqs, prompt_lens, batch_size, device, dtype, used,
                   ks=TOPK, group_k=32):
    """The mean forward KL(teacher || student) on held-out positions: exact (full vocabulary), and
    as a top-K cache gives it for each K in ks: renormalised over the K (soft_kd_kl at T = 1, the KL
    04 --kd soft takes) or with a rest bucket (rest_bucket_kl). The teacher's log-probs are rounded
    to float16, as 02 stores them. And the exact KL split by token group, sum_x p (log p - log q)
    over: the teacher's top group_k at the position, the other tokens of `used` (a (V,) bool: the
    tokens the data uses), the tokens never used; with the mass each side puts on the never-used."""
    exact, n = 0.0, 0
    renorm, rest = {k: 0.0 for k in ks}, {k: 0.0 for k in ks}
    groups = dict(top=0.0, never=0.0, p_never=0.0, q_never=0.0)
    for x, y in batches(seqs, prompt_lens, batch_size, device):
        scored = y != -100
        with autocast(device, dtype):  # (n, V): the scored positions only
            s, t = logits_fp32(student, x, scored), logits_fp32(teacher, x, scored)
        exact += token_divergence(s, t, "fkl").sum().item()
        log_p = F.log_softmax(t, -1)
        for k in ks:
            lp, ids = log_p.topk(k, dim=-1)
            lp = lp.half().float()  # what the cache keeps
            renorm[k] += soft_kd_kl(s, ids, lp, T=1.0).sum().item()
            rest[k] += rest_bucket_kl(s, ids, lp).sum().item()
        p, log_q = log_p.exp(), F.log_softmax(s, -1)
        term = torch.where(p > 0, p * (log_p - log_q), 0.0)       # (n, V): each token's share
        top = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, log_p.topk(group_k).indices, True)
        never = ~used.to(p.device) & ~top
        groups["top"] += term[top].sum().item()
        groups["never"] += term[never].sum().item()
        groups["p_never"] += (p * never).sum().item()
        groups["q_never"] += (log_q.exp() * never).sum().item()
        n += int(scored.sum())
    groups = {k: v / n for k, v in groups.items()}
    groups["used_rest"] = exact / n - groups["top"] - groups["never"]
    return {"exact": exact / n, "renorm": {k: v / n for k, v in renorm.items()},
            "rest": {k: v / n for k, v in rest.items()}, "groups": groups, "group_k": group_k}


# --- the compute: FLOPs from the tokens 04 processed (Kaplan et al., 2020's 6N and 2N) ---
def matmul_params(model):
    """N: the weights a token is multiplied by, the blocks and the output layer (tied to the token
    embedding, counted once); not the position table. Attention's own FLOPs (which grow with the
    context) are left out, as in Kaplan et al.'s C = 6N per token."""
    return model.num_params() - model.transformer.wpe.weight.numel()


def training_flops(log, n_student, n_teacher, online):
    """(student, teacher) FLOPs of one 04 run: 6N per position the student trained on (forward
    and backward), 2N per position it ran while writing its own text, 2N per position of a teacher
    forward (the online kinds run the teacher on every trained position)."""
    student = 6 * n_student * log["student_tokens"] + 2 * n_student * log["sampled_tokens"]
    return student, (2 * n_teacher * log["student_tokens"] if online else 0)


def writing_flops(data, n_teacher):
    """02's work, done once for every method: the teacher writing each kept sample (one forward
    position a token, with its KV cache) and, where 02 stored top-K log-probs, one more pass over
    them. The dropped samples are not counted."""
    positions = sum(len(s) - 1 for split in ("train", "val", "test") for s in data[split])
    return 2 * n_teacher * positions * (2 if data.get("train_topk_ids") else 1)


# --- training: one 04 run per (method, rate, seed), each in its own folder ---
def train(label, sub, flags, out, start, fresh):
    """Train (or keep, or resume) the 04 run in folder `sub`; returns its train_log."""
    plan = plan_run(out, sub, flags, start, fresh)
    if plan == "done":
        print(f"=== {label}: trained earlier with the same settings, kept ({sub})")
        return load_artifact(f"{sub}/train_log.pt", "train_log")
    resume = ["--resume"] if plan == "resume" else []
    print(f"=== {label}: python 04_train.py {' '.join(flags + resume)}")
    try:
        code, lines = run_04(flags + resume)
    except KeyboardInterrupt:
        raise LessonError(f"interrupted while training {label}: run 07 again to go on (finished "
                          f"runs are kept; this one resumes from its saved state, if it saved "
                          f"one)") from None
    if code:
        said = next((ln.strip() for ln in reversed(lines) if ln.startswith("error:")),
                    f"exit code {code}")
        raise LessonError(f"04_train.py failed for {label} ({said}); the runs trained before it "
                          f"are kept")
    return load_artifact(f"{sub}/train_log.pt", "train_log")


def method_run(args, name, lr, seed):
    """One 04 run of a method from the start, at this rate and seed: (its folder, its train_log)."""
    start = f"{args.out}/methods/start/student_last.pt"
    sub = f"{args.out}/methods/{name.replace(' ', '_')}/lr{lr:g}-seed{seed}"
    flags = ["--preset", args.preset, "--out", sub, "--epochs", str(args.epochs), "--init", start,
             "--lr", f"{lr:g}", "--seed", str(seed), *METHODS[name]]
    return sub, train(f"{name}, lr {lr:g}, seed {seed}", sub, flags, args.out, start, args.fresh)


def train_all(args, chosen, data, teacher, device, dtype):
    """The start; then for each method every rate of the grid (seed SEED), each scored on the val
    split by the method's own objective; then the other seeds at the chosen rate. Returns
    {method: {"lr": chosen rate, "grid": {rate: val objective}, "runs": [(seed, folder, log)]}}."""
    start = f"{args.out}/methods/start"
    train("start", start, ["--preset", args.preset, "--out", start, "--kd", "seq", "--epochs",
                           str(args.warm_epochs)], args.out, None, args.fresh)
    result = {}
    for name in chosen:
        grid, runs = {}, {}
        for lr in args.lr_grid:
            sub, log = runs[lr] = method_run(args, name, lr, SEED)
            student, _ = load_model(f"{sub}/student_last.pt", "student")
            grid[lr] = val_objective(METHODS[name], student.to(device), teacher, data, args,
                                     device, dtype)
            print(f"    {name} at lr {lr:g}: its own objective on val {grid[lr]:.4f}")
        best = min(grid, key=lambda lr: (not math.isfinite(grid[lr]), grid[lr]))
        more = [(SEED + i, *method_run(args, name, best, SEED + i)) for i in range(1, args.seeds)]
        scores = ", ".join(f"{r:g}: {v:.4f}" for r, v in grid.items())
        print(f"=== {name}: lr {best:g} chosen on val ({scores})")
        result[name] = {"lr": best, "grid": grid, "runs": [(SEED, *runs[best]), *more]}
    return result


# --- measuring every student: the same held-out samples, after the same number of steps ---
def measure_all(args, trained, teacher, test, test_P, device, dtype):
    """A row per model: {"runs": [one measure per seed], "mean", "min", "max": over the runs}; the
    methods' rows also carry their rate, grid and per-run time and FLOPs."""
    n_teacher = matmul_params(teacher)
    rows, steps = {}, {}
    for name in ["teacher", "start", *trained]:
        runs = []
        folders = ([(None, None, None)] if name == "teacher" else
                   [(None, f"{args.out}/methods/start", None)] if name == "start" else
                   trained[name]["runs"])
        for seed, sub, log in folders:
            model = teacher if sub is None else load_model(f"{sub}/student_last.pt", "student")[0]
            r = measure(model.to(device), teacher, test, test_P, args, device, dtype)
            if log is not None:
                online = options(METHODS[name])["--kd"] in ONLINE
                r["student_flops"], r["teacher_flops"] = training_flops(
                    log, matmul_params(model), n_teacher, online)
                r["time"] = log["wall_time"]
                steps[f"{name} (seed {seed})"] = log["step"][-1]
            runs.append(r)
            print(f"  {name:<24} " + (f"seed {seed} " if seed else "") +
                  f"ppl {r['ppl']:6.2f} | KL(t||s) {r['fkl']:.3f} | KL(s||t) {r['rkl']:.3f} | "
                  f"acceptance {r['acceptance']:.3f} | teacher ppl of own text "
                  f"{r['teacher_ppl_own']:6.2f} (+-{r['own_spread']:.0%}) | distinct-2 "
                  f"{r['distinct_2']:.3f}" + (f" | {r['time']:.0f}s" if "time" in r else ""))
        rows[name] = summarise(runs)
        if name in trained:
            rows[name].update(lr=trained[name]["lr"], grid=trained[name]["grid"],
                              folders=[os.path.relpath(sub, args.out)  # within --out
                                       for _, sub, _ in trained[name]["runs"]])
    if len(set(steps.values())) > 1:
        raise LessonError(f"the runs trained for different numbers of steps ({steps}): run 07 "
                          f"with --fresh")
    return rows, next(iter(steps.values()), 0)


def summarise(runs):
    """The mean, min and max over the runs (seeds) of every number of a row."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    return {"runs": runs, **{stat: {k: f([r[k] for r in runs]) for k in keys}
                            for stat, f in (("mean", lambda v: sum(v) / len(v)), ("min", min),
                                            ("max", max))}}


def chart(rows, path):
    """Left: what each method traded (coverage of the teacher's text against how plausible its own
    text is to the teacher); right: what it bought for its compute (acceptance against the training
    FLOPs). Each method's point is its mean over seeds, the bars its range."""
    names = [n for n in rows if n in METHODS]
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
        if name in METHODS:
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
    ax.set_title("What each method trades (lower left is better)")
    ax.grid(alpha=0.3, which="both")
    bx.set_xscale("log")
    bx.set_xlabel("training FLOPs, student + teacher (the start and 02 not counted)")
    bx.set_ylabel("acceptance: mean sum min(p, q)\n(higher: a better draft for the teacher)")
    bx.set_title("What it bought for its compute (upper left is better)")
    bx.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    if in_notebook():
        plt.show()  # in a notebook: shown under the cell, and saved
    plt.close(fig)


def get_args():
    p = lesson_parser(__doc__)
    flag = p.add_argument
    flag("--warm-epochs", type=positive_int,
         help="epochs of sequence-level KD from student_init.pt that make the common start: what "
              "04 trains by default (gpt2: 3, tiny: 6)")
    flag("--epochs", type=positive_int,
         help="epochs of training for every method, from the start (gpt2: 1, tiny: 1)")
    flag("--lr-grid", type=positive_floats,
         help="the learning rates tried for each method, comma-separated; each method keeps the "
              "one its own objective likes best on val (gpt2: 1e-4,3e-4,1e-3; tiny: "
              "1e-3,3e-3,1e-2)")
    flag("--seeds", type=positive_int,
         help="runs per method at its chosen rate, seeds 1337, 1338, ... (gpt2: 1, tiny: 3)")
    flag("--methods", default=",".join(METHODS),
         help=f"the methods to run, comma-separated (default: all: {','.join(METHODS)})")
    flag("--batch-size", type=positive_int, default=8, help="sequences per batch when measuring")
    flag("--own-samples", type=positive_int,
         help="texts each model writes per held-out prompt, graded by the teacher (gpt2: 4, "
              "tiny: 2)")
    flag("--fresh", action="store_true",
         help="train every run again, even those already trained")
    return parse(p, PRESETS)


# --- bookkeeping: which runs are done, and the report ---
INPUTS = {"teacher.pt": "teacher", "generated.pt": "generated", "student_init.pt": "student_init"}


def link(src, dst):
    """dst points at src (a symbolic link, or a copy where links are not allowed)."""
    if os.path.lexists(dst):
        os.remove(dst)
    try:
        os.symlink(os.path.abspath(src), dst)
    except OSError:
        shutil.copyfile(src, dst)


def plan_run(out, sub, flags, start, fresh):
    """"done", "resume" or "fresh" for the 04 run in folder `sub`. Its recipe (the flags, and the
    size and time of each input file and of the start) is written to method.json when it begins:
    a run counts as done if its train_log.pt is newer than the same recipe, and resumes only from a
    train_state.pt saved under that same recipe (an older recipe's state is never resumed)."""
    os.makedirs(sub, exist_ok=True)
    recipe = {"flags": flags, "inputs": {f: stamp(f"{out}/{f}") for f in INPUTS}}
    if start is not None:
        recipe["start"] = stamp(start)
    done, log, state = f"{sub}/method.json", f"{sub}/train_log.pt", f"{sub}/train_state.pt"
    same = False
    if os.path.exists(done) and not fresh:
        with open(done) as f:
            same = json.load(f) == recipe
    if same and newer(log, done):
        return "done"
    for file in INPUTS:
        link(f"{out}/{file}", f"{sub}/{file}")
    # (a resumed run keeps method.json's time, which dates the state)
    if same and newer(state, done):
        return "resume"
    with open(done, "w") as f:
        json.dump(recipe, f)
    return "fresh"


def stamp(path):
    """A file's size and modification time: it changed if either did."""
    return [os.path.getsize(path), os.path.getmtime(path)]


def newer(path, than):
    """Whether `path` exists and was written no earlier than `than`."""
    return os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(than)


def cell(row, key, fmt, spread):
    """A table cell: the mean over seeds, with the seeds' range (min-max) if there are several."""
    text = fmt.format(row["mean"][key])
    if spread:
        text += f" ({fmt.format(row['min'][key])}–{fmt.format(row['max'][key])})"
    return text


def verdicts(rows, seeds):
    """For each column: the best method by its mean, and whether the seeds separate it from every
    other: a difference is claimed only where the ranges (min-max over seeds) do not overlap."""
    methods = {n: r for n, r in rows.items() if n in METHODS}
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


def report_lines(args, rows, price, price_of, steps, n_test, n_vocab, compute, who):
    """methods.md, line by line: the table, what it claims, the rates, the compute, the price of a
    top-K cache."""
    first = next(r for n, r in rows.items() if n in METHODS)
    spread = args.seeds > 1
    label = {"teacher": "teacher (reference)", "start": f"start ({args.warm_epochs} epochs of seq)"}
    md = ["# The divergence lab\n",
          f"Teacher: {who}. Every method starts from the same student (student_init.pt after "
          f"{args.warm_epochs} epochs of sequence-level KD) and trains {steps} optimizer steps "
          f"({args.epochs} epochs, 04's defaults for the {args.preset} preset otherwise), at the "
          f"learning rate its own objective chose on the val split from {{"
          f"{', '.join(f'{lr:g}' for lr in args.lr_grid)}}}, with {args.seeds} seed(s) ("
          f"{', '.join(str(SEED + i) for i in range(args.seeds))}: data order, dropout, the "
          f"student's sampling)." + (" Each cell: the mean over seeds (the seeds' min–max)." if
                                    spread else "") +
          f" Measured on the teacher's {n_test} held-out test samples (prompts not scored); own "
          f"text: {args.own_samples} continuations of each test prompt at temperature 1, "
          f"{first['runs'][0]['own_tokens']:,} tokens or fewer per model.\n",
          "| method | lr | " + " | ".join(COLUMNS) + " | FLOPs, student + teacher | time |",
          "|---|---:|" + "---:|" * (len(COLUMNS) + 2)]
    for name, r in rows.items():
        cells = [cell(r, key, fmt, spread and name in METHODS) for key, fmt, _ in COLUMNS.values()]
        flops = (f"{r['mean']['student_flops']:.2g} + {r['mean']['teacher_flops']:.2g}"
                 if "student_flops" in r["mean"] else "")
        time_ = f"{r['mean']['time']:.0f} s" if "time" in r["mean"] else ""
        md.append(f"| {label.get(name, name)} | {r['lr']:g} | " if "lr" in r else
                  f"| {label.get(name, name)} | | ")
        md[-1] += " | ".join(cells) + f" | {flops} | {time_} |"
    md += ["", "What the table supports (a difference is claimed only where the seeds' ranges do "
           "not overlap; with 2 or 3 seeds even that is a weak test):", *verdicts(rows, args.seeds),
           "", "How to read it: the first three numbers and acceptance ask whether the student "
           "covers what the teacher says, on the teacher's own text; the next two ask whether "
           "what the student writes itself is what the teacher would write, and how varied it is. "
           "Every method is measured on both; none is scored by its own loss here.",
           "", "## The learning rate each method chose\n",
           "Each method's own objective on the val split (lower is better) after the same "
           "steps, at each rate (seed 1337):\n",
           "| method | " + " | ".join(f"lr {lr:g}" for lr in args.lr_grid) + " | chosen |",
           "|---|" + "---:|" * (len(args.lr_grid) + 1)]
    for name, r in rows.items():
        if "grid" in r:
            md.append(f"| {name} | " + " | ".join(f"{r['grid'][lr]:.4f}" for lr in args.lr_grid)
                      + f" | {r['lr']:g} |")
    md += ["", "## Compute\n",
           f"FLOPs as Kaplan et al. (2020) count them: 6N per token the student trains on, 2N per "
           f"token of a forward pass (the teacher's, online; the student's, writing its own text), "
           f"N the weights a token is multiplied by (the blocks and the output layer, not the "
           f"position table; attention's context-dependent FLOPs left out): student N = "
           f"{compute['student_N']:,}, teacher N = {compute['teacher_N']:,}. Not in the table: the "
           f"start, {compute['start_flops']:.2g} FLOPs for every method alike, and 02's writing "
           f"of the data (the teacher's samples and top-K pass), {compute['writing']:.2g} FLOPs "
           f"once. Validation passes are not counted. Time is wall time on this machine, "
           f"sampling included.",
           *price_lines(price, price_of, n_vocab, args.preset),
           "", "Each run is in methods/<method>/lr<rate>-seed<seed>/ (train_log.pt, "
           "student_last.pt); rerun one by hand with the command 07 printed for it."]
    return md


def price_lines(price, price_of, n_vocab, preset):
    """The price-of-top-K section of methods.md: the KL a cache gives against the exact one, and
    where the exact KL comes from, by token group."""
    g, k = price["groups"], price["group_k"]
    md = ["", f"## The price of a top-K cache (the {price_of} student, seed {SEED})\n",
          f"Exact forward KL(teacher ‖ student), full vocabulary: **{price['exact']:.4f}** nats "
          f"per token. What a cache of the teacher's K most likely tokens gives instead (int32 "
          f"id + float16 log-prob = 6 bytes each; the rest bucket needs no extra bytes, since the "
          f"stored log-probs are normalised over the whole vocabulary; the full distribution "
          f"would be {2 * n_vocab:,} bytes a token in float16):\n",
          "| K | bytes per token | renormalised over K (04 --kd soft at T=1) | with a rest bucket "
          "(a lower bound) |", "|---:|---:|---:|---:|"]
    md += [f"| {K} | {6 * K} | {price['renorm'][K]:.4f} | {price['rest'][K]:.4f} |"
           for K in price["renorm"]]
    md += ["", f"Where the exact KL comes from, sum_x p (log p − log q) split by token group: the "
           f"teacher's top {k} at each position **{g['top']:.4f}**; the other tokens that the "
           f"teacher's training text uses **{g['used_rest']:.4f}**; the {price['n_never']:,} "
           f"tokens it never uses **{g['never']:.4f}** (the teacher puts {g['p_never']:.2g} of "
           f"its mass there per position, the student {g['q_never']:.2g})."]
    if price["never_zero"]:
        md[-1] += (" The teacher's embedding rows of the never-used tokens are all zero (it never "
                   "trained them), so each has logit 0 at every position: that share is the "
                   f"{preset} teacher's artefact, not something a real teacher's tail does.")
    return md


def main():
    args = get_args()
    out = args.out
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        raise LessonError(f"unknown method {', '.join(unknown) or '(none)'}: choose among "
                          f"{', '.join(METHODS)}")
    enc = get_tokenizer()
    device = get_device()
    dtype = pick_dtype(device)

    # --- inputs: checked here once, so that a problem is one line, not many failed runs ---
    for file, kind in INPUTS.items():
        check_preset(load_artifact(f"{out}/{file}", kind), f"{out}/{file}", args.preset)
    data = load_artifact(f"{out}/generated.pt", "generated",
                         keys=("train", "val", "test", "test_prompt_lens", "val_prompt_lens"))
    if any(options(METHODS[m])["--kd"] == "soft" for m in chosen) and not data.get("val_topk_ids"):
        raise LessonError("the soft methods need the teacher's top-K log-probs: run "
                          "02_generate.py with --topk-logits 32")
    test, test_P = data["test"], data["test_prompt_lens"]
    teacher, teacher_ckpt = load_model(f"{out}/teacher.pt", "teacher", vocab_size=enc.n_vocab)
    teacher.to(device)

    # --- training: the start, then each method's grid of rates and its seeds ---
    t_lab = time.time()
    trained = train_all(args, chosen, data, teacher, device, dtype)

    # --- measuring: every student after the same number of steps, on the same held-out samples ---
    n_tokens = sum(len(s) - P for s, P in zip(test, test_P))
    print(f"\nmeasuring on generated-test ({len(test)} samples, {n_tokens:,} sampled tokens; each "
          f"model writes {args.own_samples} texts per prompt) | {device} {dtype}")
    rows, steps = measure_all(args, trained, teacher, test, test_P, device, dtype)
    used = torch.zeros(enc.n_vocab, dtype=torch.bool)
    for s in data["train"]:
        used[s] = True  # the tokens the teacher's training text uses
    price_of = "soft" if "soft" in trained else chosen[0]
    first = load_model(f"{trained[price_of]['runs'][0][1]}/student_last.pt", "student")[0]
    price = price_of_top_k(first.to(device), teacher, test, test_P, args.batch_size, device,
                           dtype, used)
    price["never_zero"] = bool(teacher.transformer.wte.weight[~used.to(device)].abs().max() == 0)
    price["n_never"] = int((~used).sum())

    # --- the report ---
    start_log = load_artifact(f"{out}/methods/start/train_log.pt", "train_log")
    compute = {"writing": writing_flops(data, matmul_params(teacher)),
               "student_N": matmul_params(first), "teacher_N": matmul_params(teacher),
               "start_flops": training_flops(start_log, matmul_params(first), 0, False)[0]}
    md = report_lines(args, rows, price, price_of, steps, len(test), enc.n_vocab, compute,
                      teacher_ckpt.get("source") or "see teacher.pt")
    save_artifact({"kind": "methods", "preset": args.preset, "rows": rows, "price": price,
                   "price_of": price_of, "steps": steps, "epochs": args.epochs,
                   "warm_epochs": args.warm_epochs, "lr_grid": args.lr_grid, "seeds": args.seeds,
                   "compute": compute}, f"{out}/methods.pt")
    write_text("\n".join(md) + "\n", f"{out}/methods.md")
    chart(rows, f"{out}/methods.png")
    print(f"\nprice of top-K ({price_of} student): exact KL {price['exact']:.4f}; "
          + ", ".join(f"K={k}: {price['renorm'][k]:.4f} renormalised, {price['rest'][k]:.4f} "
                      f"with rest" for k in TOPK))
    print(f"lab finished in {time.time() - t_lab:.0f}s | wrote {out}/methods.md, methods.png, "
          f"methods.pt")


if __name__ == "__main__":
    run_lesson(main, oom="a smaller --batch-size (sequences measured at once)")
