"""Lesson 07: the divergence lab. One teacher, one data set, one starting student and the same
number of optimizer steps, trained nine ways (METHODS below; --methods 2025 and caches add seven
more), each at the learning rate its own objective picks on val from --lr-grid, then over --seeds;
every student measured alike on the teacher's held-out samples: perplexity, the exact KL both
ways, acceptance (1 - TVD, the chance a teacher keeps its speculative-decoding draft), the
teacher's perplexity of the student's own text, distinct-2, and training FLOPs. Each run is lesson
04 itself, a command 07 prints, in its own folder. docs/lab.md explains the methods, the fair
budget, the columns and the measured table.

Reads:  artifacts/teacher.pt, generated.pt, student_init.pt
Writes: artifacts/methods/start/, methods/<method>/lr<rate>-seed<seed>/ (each 04 run),
        methods.pt, methods.md, methods.png
Run:    python 07_methods.py          (add --preset tiny for a CPU run of about ten minutes; a
        second run keeps the runs already trained and resumes an interrupted one)
"""
import math
import os
import time

import torch
from torch.nn import functional as F

from common.data import batches
from common.distill import KD, SAMPLED, acceptance, kl, loss_sums, stored_targets
from common.model import logits_fp32
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
from common.plumbing.cli import lesson_parser, parse, positive_floats, positive_int
from common.plumbing.device import get_device, precision
from common.plumbing.lab_report import chart, report_lines
from common.plumbing.runs import gpu_lent, train
from common.sampling import continue_each
from common.tokenizer import EOT, get_tokenizer

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
    # 2024-26 (docs/lab.md): DistiLLM's skew KL(p || 0.1 p + 0.9 q); AKL, FKL and RKL mixed by
    # where p and q differ (head or tail); entropy-aware on-policy, RKL + FKL where the teacher's
    # entropy is above 1 nat; rkl-sampled with the exact RKL as its baseline (vOPD)
    "skl": ["--kd", "skl"],
    "akl": ["--kd", "akl"],
    "eopd+on-policy 1": ["--kd", "eopd", "--on-policy", "1"],
    "rkl-vopd+on-policy 1": ["--kd", "rkl-vopd", "--on-policy", "1"],
    # caches at about equal bytes a position, all at T = 1: the teacher's top 5 (30 bytes),
    # renormalised or with a rest bucket, against 32 tokens drawn from it (02 --cache-draws 32:
    # about 6 distinct ids, 31 bytes, on the tiny teacher; unbiased, Anshumann et al., 2025)
    "top-5": ["--kd", "soft", "--soft-k", "5", "--kd-temperature", "1"],
    "top-5 + rest": ["--kd", "soft", "--soft-k", "5", "--soft-tail", "rest", "--kd-temperature",
                     "1"],
    "sampled": ["--kd", "soft", "--soft-tail", "sampled", "--kd-temperature", "1"],
}
GROUPS = {"default": list(METHODS)[:9],  # the lab in its time on the tiny preset
          "2025": ["skl", "akl", "eopd+on-policy 1", "rkl-vopd+on-policy 1"],
          "caches": ["seq", "top-5", "top-5 + rest", "sampled"]}  # needs 02 --cache-draws 32
# The budget: epochs of sequence-level KD for the start (from student_init.pt, at 04's from-scratch
# rate), then the same epochs for every method at a fine-tuning rate from the grid; the seeds.
PRESETS = {"gpt2": dict(warm_epochs=3, epochs=1, lr_grid=[1e-4, 3e-4, 1e-3], seeds=1,
                        own_samples=4),
           "tiny": dict(warm_epochs=6, epochs=1, lr_grid=[1e-3, 3e-3, 1e-2], seeds=3,
                        own_samples=2)}
SEED = 1337                 # 04's default: the grid runs use it, further seeds count up from it
SAMPLE_SEED = 1234          # every model writes its own text with the same seeded generator
INPUTS = {"teacher.pt": "teacher", "generated.pt": "generated", "student_init.pt": "student_init"}


# --- measuring ---
def held_out_scores(y, s, t):
    """At each of n sampled positions of the teacher's held-out samples, from the student's and
    the teacher's logits (n, V): the student's NLL of the teacher's token, the exact forward and
    reverse KL between the full distributions, and the acceptance sum_x min(p, q) = 1 - TVD ->
    (4, n)."""
    log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)
    nll = -log_q.gather(-1, y[:, None])[:, 0]                    # -log q(teacher's token)
    return torch.stack([nll, kl(log_p, log_q), kl(log_q, log_p),  # KL(p || q), KL(q || p)
                        acceptance(log_p.exp(), log_q.exp())])


def sample_nll(model, seqs, prompt_lens, batch_size):
    """The model's NLL of each sequence's sampled tokens (prompt not scored): per-sample sums and
    counts."""
    def nll(y, logits):  # (1, n)
        return F.cross_entropy(logits, y, reduction="none")[None]
    sums, counts = score_sampled([model], seqs, prompt_lens, nll, batch_size)
    return sums[0], counts


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


def measure(student, teacher, held_out, args, prec):
    """Every number of a table row for one model, on held_out (the teacher's test samples and their
    prompt lengths). The teacher's perplexity of the model's own text comes with its spread within
    this model's texts (+-x%: two standard errors)."""
    test, test_P = held_out
    with prec.autocast():
        sums, counts = score_sampled([student, teacher], test, test_P, held_out_scores,
                                     args.batch_size)
    nll, fkl, rkl, acc = (sums.sum(1) / counts.sum()).tolist()  # means over every scored token
    text, P = own_text(student, test, test_P, prec.device, args.own_samples)
    with prec.autocast():
        own, own_2se = mean_and_spread(*sample_nll(teacher, text, P, args.batch_size))
    return {"ppl": math.exp(nll), "fkl": fkl, "rkl": rkl, "acceptance": acc,
            "teacher_ppl_own": math.exp(own), "own_spread": math.exp(own_2se) - 1,
            "distinct_2": distinct_2(text, P),
            "own_tokens": sum(len(t) - p for t, p in zip(text, P))}


def options(flags):
    """04's flags of a method as a dict: {"--kd": "jsd", "--on-policy": "0.5", ...}."""
    return dict(zip(flags[::2], flags[1::2]))


@torch.no_grad()
def val_objective(flags, student, teacher, data, args, prec):
    """The method's own loss on the val split, for choosing its learning rate: what it trains on
    (its divergence, or its KD loss), on the text it trains on (the teacher's val samples, the
    student's own continuations of the val prompts, or both in its --on-policy share). rkl-sampled
    is scored by the exact reverse KL, of which its loss is an estimate. Lower is better."""
    share = float(options(flags).get("--on-policy", 0))
    kd = KD.from_flags(flags)  # the loss 04 trains on, exactly, with 04's defaults
    if kd.kind in SAMPLED:  # an estimate of the reverse KL: scored by the exact one
        kd.kind = "rkl"
    val, P = data["val"], data["val_prompt_lens"]
    topk = stored_targets(data, "val", kd, range(len(val))) if kd.kind == "soft" else None
    own, _ = (own_text(student, val, P, prec.device, 1, seed=SAMPLE_SEED + 1) if share else
              (None, None))
    total = 0.0
    for text, weight in ((val, 1 - share), (own, share)):
        if not weight:
            continue
        loss, n = 0.0, 0
        for x, y, *stored in batches(text, P, args.batch_size, prec.device, topk):
            scored = y != -100
            with prec.autocast():  # (n, V): the scored positions only
                s = logits_fp32(student, x, scored)
                t = logits_fp32(teacher, x, scored) if kd.online else None
            at_scored = tuple(v[scored] for v in stored) or None  # soft: the teacher's top-K
            loss += loss_sums(s, y[scored], kd, at_scored, t)[0].item()  # as 04 trains
            n += int(scored.sum())
        total += weight * loss / n
    return total


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
def method_run(args, name, lr, seed):
    """One 04 run of a method from the start, at this rate and seed: (its folder, its train_log)."""
    start, label = f"{args.out}/methods/start/student_last.pt", f"{name}, lr {lr:g}, seed {seed}"
    sub = f"{args.out}/methods/{name.replace(' ', '_')}/lr{lr:g}-seed{seed}"
    flags = ["--preset", args.preset, "--out", sub, "--epochs", str(args.epochs), "--init", start,
             "--lr", f"{lr:g}", "--seed", str(seed), *METHODS[name]]
    return sub, train(label, sub, flags, args.out, start, args.fresh, INPUTS)


def best_rate(grid):
    """The rate of the lowest val objective ({rate: objective}); a rate that diverged (its
    objective nan or inf) only if every rate did."""
    return min(grid, key=lambda lr: (not math.isfinite(grid[lr]), grid[lr]))


def train_all(args, chosen, data, teacher, prec):
    """The start; then for each method every rate of the grid (seed SEED), each scored on the val
    split by the method's own objective; then the other seeds at the chosen rate. Returns
    {method: {"lr": chosen rate, "grid": {rate: val objective}, "runs": [(seed, folder, log)]}}."""
    start = f"{args.out}/methods/start"
    with gpu_lent(teacher):
        train("start", start, ["--preset", args.preset, "--out", start, "--kd", "seq", "--epochs",
                               str(args.warm_epochs)], args.out, None, args.fresh, INPUTS)
    result = {}
    for name in chosen:
        grid, runs = {}, {}
        for lr in args.lr_grid:
            with gpu_lent(teacher):  # 04 gets the whole GPU while it trains
                sub, log = runs[lr] = method_run(args, name, lr, SEED)
            student, _ = load_model(f"{sub}/student_last.pt", "student")
            grid[lr] = val_objective(METHODS[name], student.to(prec.device), teacher, data,
                                     args, prec)
            print(f"    {name} at lr {lr:g}: its own objective on val {grid[lr]:.4f}")
        best = best_rate(grid)
        with gpu_lent(teacher):
            more = [(SEED + i, *method_run(args, name, best, SEED + i))
                    for i in range(1, args.seeds)]
        scores = ", ".join(f"{r:g}: {v:.4f}" for r, v in grid.items())
        print(f"=== {name}: lr {best:g} chosen on val ({scores})")
        result[name] = {"lr": best, "grid": grid, "runs": [(SEED, *runs[best]), *more]}
    return result


# --- measuring every student: the same held-out samples, after the same number of steps ---
def measure_all(args, trained, teacher, held_out, prec):
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
            r = measure(model.to(prec.device), teacher, held_out, args, prec)
            if log is not None:
                online = KD.from_flags(METHODS[name]).online
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
    flag("--methods", default="default",
         help=f"the methods to run, comma-separated: names ({', '.join(METHODS)}) or groups "
              f"({', '.join(f'{g}: {len(m)}' for g, m in GROUPS.items())}, all) (default: default, "
              f"the first nine)")
    flag("--batch-size", type=positive_int, default=8, help="sequences per batch when measuring")
    flag("--own-samples", type=positive_int,
         help="texts each model writes per held-out prompt, graded by the teacher (gpt2: 4, "
              "tiny: 2)")
    flag("--fresh", action="store_true",
         help="train every run again, even those already trained")
    return parse(p, PRESETS)


def main():
    args = get_args()
    out = args.out
    groups = {**GROUPS, "all": list(METHODS)}
    named = [m.strip() for m in args.methods.split(",") if m.strip()]
    chosen = list(dict.fromkeys(m for n in named for m in groups.get(n, [n])))  # in order, once
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        raise LessonError(f"unknown method {', '.join(unknown) or '(none)'}: choose among "
                          f"{', '.join(METHODS)}")
    enc = get_tokenizer()
    prec = precision(get_device())  # the device and the precision, decided once

    # --- inputs: checked here once, so that a problem is one line, not many failed runs ---
    for file, kind in INPUTS.items():
        check_preset(load_artifact(f"{out}/{file}", kind), f"{out}/{file}", args.preset)
    data = load_artifact(f"{out}/generated.pt", "generated",
                         keys=("train", "val", "test", "test_prompt_lens", "val_prompt_lens"))
    soft = any(KD.from_flags(METHODS[m]).kind == "soft" for m in chosen)
    if soft and not data.get("val_topk_ids"):
        raise LessonError("the soft methods need the teacher's top-K log-probs: run "
                          "02_generate.py with --topk-logits 32")
    if "sampled" in chosen and not data.get("train_sampled_ids"):
        raise LessonError("the sampled method needs the teacher's sampled cache: run "
                          "02_generate.py with --cache-draws 32")
    test, test_P = data["test"], data["test_prompt_lens"]
    teacher, teacher_ckpt = load_model(f"{out}/teacher.pt", "teacher", vocab_size=enc.n_vocab)
    teacher.to(prec.device)

    # --- training: the start, then each method's grid of rates and its seeds ---
    t_lab = time.time()
    trained = train_all(args, chosen, data, teacher, prec)

    # --- measuring: every student after the same number of steps, on the same held-out samples ---
    n_tokens = sum(len(s) - P for s, P in zip(test, test_P))
    print(f"\nmeasuring on generated-test ({len(test)} samples, {n_tokens:,} sampled tokens; each "
          f"model writes {args.own_samples} texts per prompt) | {prec.device} {prec.dtype}")
    rows, steps = measure_all(args, trained, teacher, (test, test_P), prec)
    first = load_model(f"{next(iter(trained.values()))['runs'][0][1]}/student_last.pt",
                       "student")[0]

    # --- the report ---
    start_log = load_artifact(f"{out}/methods/start/train_log.pt", "train_log")
    compute = {"writing": writing_flops(data, matmul_params(teacher)),
               "student_N": matmul_params(first), "teacher_N": matmul_params(teacher),
               "start_flops": training_flops(start_log, matmul_params(first), 0, False)[0]}
    lab = {"preset": args.preset, "steps": steps, "epochs": args.epochs,
           "warm_epochs": args.warm_epochs, "lr_grid": args.lr_grid, "seeds": args.seeds,
           "first_seed": SEED, "own_samples": args.own_samples, "n_test": len(test),
           "teacher": teacher_ckpt.get("source") or "see teacher.pt"}
    md = report_lines(lab, rows, compute)
    save_artifact({"kind": "methods", **lab, "rows": rows, "compute": compute},
                  f"{out}/methods.pt")
    write_text("\n".join(md) + "\n", f"{out}/methods.md")
    chart(rows, f"{out}/methods.png")
    print(f"lab finished in {time.time() - t_lab:.0f}s | wrote {out}/methods.md, methods.png, "
          f"methods.pt")


if __name__ == "__main__":
    run_lesson(main, oom="a smaller --batch-size (sequences measured at once)")
