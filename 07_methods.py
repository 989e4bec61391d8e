"""Lesson 07: the divergence lab. One teacher, one data set, one starting student, one seed and the
same number of optimizer steps, trained six ways, then measured the same way:
  seq                sequence-level KD: cross-entropy on the teacher's samples (Kim & Rush, 2016)
  soft               plus the teacher's stored top-32 distributions (Hinton et al., 2015)
  fkl                forward KL(teacher || student) to the full distribution, the teacher online
  rkl                reverse KL(student || teacher), the teacher online (MiniLLM, Gu et al., 2024)
  jsd+on-policy 0.5  GKD's recipe (Agarwal et al., 2024): generalized JSD with beta 0.5, and half
                     of the micro-batches written by the student itself, then graded by the teacher
  rkl+on-policy 1    reverse KL on the student's own text only
The start: the student after a short sequence-level KD run (--warm-epochs), as MiniLLM and GKD
start from a supervised student. (From random weights, reverse KL barely moves: the student's mass
is spread over 50,257 tokens, and the gradient of KL(s || t) at a token is weighted by the
student's own probability there, so every token's pull is tiny.) Forward KL makes the student
cover everything the teacher might say (a low perplexity on the teacher's text); reverse KL and
on-policy training make it say only what the teacher would say (the teacher finds the student's
own text plausible). The table shows both sides of that trade, per method:
  ppl on teacher text     the student's perplexity on the teacher's held-out test samples
  KL(t||s), KL(s||t)      the exact forward and reverse KL, full vocabulary, on those positions
  teacher ppl of own text the teacher's perplexity on text the student writes itself (temperature
                          1, untruncated: the student's real distribution), continuing the same
                          prompts
  distinct-2              the share of distinct token pairs in that text (low: it repeats itself)
  time                    training wall time, the start excluded (on-policy pays for sampling)
and the price of a top-K cache: how far the KL that soft KD computes from K stored tokens is from
the exact one, for K = 1, 8, 32, 128, with the missing mass renormalised away (as 04 does) or kept
as one "rest" bucket.

Why 07 runs 04 as a subprocess, once per method: the project keeps one training loop, and 04 stays
the lesson that shows it; each run here is exactly a command you could type (07 prints it), with
its own folder, log and resumable state. This lesson is about the comparison: the settings held
equal, the measurements, and how to read them. Every student is compared after the same number of
steps (student_last.pt, not the checkpoint 04 picked on val cross-entropy, which would favour the
methods that minimise cross-entropy).

Reads:  artifacts/teacher.pt, generated.pt, student_init.pt
Writes: artifacts/methods/start/ (the starting student), methods/<method>/ (each method's 04 run:
        student_last.pt, train_log.pt, ...),
        artifacts/methods.pt, methods.md, methods.png
Run:    python 07_methods.py                (add --preset tiny for a CPU run of about two minutes)
        a second run skips the methods already trained with the same settings, and resumes one
        that was interrupted
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

from common.artifacts import (
    LessonError,
    check_preset,
    load_artifact,
    load_model,
    run_lesson,
    save_artifact,
    write_text,
)
from common.cli import in_notebook, lesson_parser, parse, positive_int
from common.device import autocast, get_device, pick_dtype
from common.distill import make_batch, soft_kd_kl, token_divergence
from common.perplexity import logits_fp32
from common.sampling import continue_each
from common.tokenizer import EOT, get_tokenizer

if not in_notebook():
    matplotlib.use("Agg")  # from a shell: draw straight to a file
import matplotlib.pyplot as plt  # noqa: E402

# --- settings ---
# name -> the flags 04 gets (besides --preset, --out and --epochs, the same for every method)
METHODS = {
    "seq": ["--kd", "seq"],
    "soft": ["--kd", "soft"],
    "fkl": ["--kd", "fkl"],
    "rkl": ["--kd", "rkl"],
    "jsd+on-policy 0.5": ["--kd", "jsd", "--jsd-beta", "0.5", "--on-policy", "0.5"],
    "rkl+on-policy 1": ["--kd", "rkl", "--on-policy", "1"],
}
# The budget, in epochs over the teacher's training samples: sequence-level KD for the start (what
# 04 trains by default), then the same number of epochs for every method.
PRESETS = {"gpt2": dict(warm_epochs=3, epochs=1), "tiny": dict(warm_epochs=6, epochs=2)}
TOPK = (1, 8, 32, 128)      # cache sizes for the price-of-top-K table
SAMPLE_SEED = 1234           # every model writes its own text with the same seeded generator
HERE = os.path.dirname(os.path.abspath(globals().get("__file__", "04_train.py")))
LESSON_04 = os.path.join(HERE, "04_train.py")


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


def link(src, dst):
    """dst points at src (a symbolic link, or a copy where links are not allowed)."""
    if os.path.lexists(dst):
        os.remove(dst)
    try:
        os.symlink(os.path.abspath(src), dst)
    except OSError:
        shutil.copyfile(src, dst)


def batches(seqs, prompt_lens, batch_size, device):
    """(x, y) batches of the sequences, prompts not scored."""
    for i in range(0, len(seqs), batch_size):
        yield make_batch(seqs[i:i + batch_size], device=device,
                         prompt_lens=prompt_lens[i:i + batch_size])


@torch.no_grad()
def held_out_scores(student, teacher, seqs, prompt_lens, batch_size, device, dtype):
    """On the teacher's held-out samples, at every sampled position: the student's NLL of the
    teacher's token and the exact forward and reverse KL between the full distributions. Returns
    per-sample sums (3, samples) and the scored tokens per sample: the spread between samples says
    how sure a mean is."""
    sums, counts = [], []
    for x, y in batches(seqs, prompt_lens, batch_size, device):
        with autocast(device, dtype):
            s, t = logits_fp32(student, x), logits_fp32(teacher, x)  # (B, L, V) each
        scored = y != -100
        nll = F.cross_entropy(s.transpose(1, 2), y, ignore_index=-100, reduction="none")  # (B, L)
        fkl, rkl = token_divergence(s, t, "fkl"), token_divergence(s, t, "rkl")
        per_position = torch.stack([nll, fkl, rkl])
        sums.append((per_position * scored).sum(-1).double().cpu())  # (3, B)
        counts.append(scored.sum(-1).cpu())
    return torch.cat(sums, 1), torch.cat(counts)


@torch.no_grad()
def sample_nll(model, seqs, prompt_lens, batch_size, device, dtype):
    """The model's NLL of each sequence's sampled tokens (prompt not scored): per-sample sums and
    counts."""
    sums, counts = [], []
    for x, y in batches(seqs, prompt_lens, batch_size, device):
        with autocast(device, dtype):
            logits = logits_fp32(model, x)
        nll = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100, reduction="none")
        sums.append(nll.sum(-1).double().cpu())
        counts.append((y != -100).sum(-1).cpu())
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


def rest_bucket_kl(student_logprobs, ids, teacher_logprobs):
    """KL over K + 1 buckets: the teacher's K stored tokens, and one "rest" bucket holding all other
    tokens, whose mass is 1 - (the K tokens' mass) on each side. A cache already holds what it
    needs: the stored log-probs are normalised over the whole vocabulary. Merging tokens into one
    bucket can only hide differences, so this is never above the exact KL: a lower bound that
    tightens as K grows. student_logprobs (..., V); ids, teacher_logprobs (..., K) -> (...)."""
    log_q = student_logprobs.gather(-1, ids)                                       # (..., K)
    kl = (teacher_logprobs.exp() * (teacher_logprobs - log_q)).sum(-1)
    p_rest = (-torch.expm1(torch.logsumexp(teacher_logprobs, -1))).clamp(min=0)   # 1 - sum of p's
    q_rest = (-torch.expm1(torch.logsumexp(log_q, -1))).clamp(min=1e-30)
    rest = p_rest * (p_rest.clamp(min=1e-30).log() - q_rest.log())
    return kl + torch.where(p_rest > 0, rest, 0.0)


@torch.no_grad()
def price_of_top_k(student, teacher, seqs, prompt_lens, batch_size, device, dtype):
    """The mean forward KL(teacher || student) on held-out positions: exact (full vocabulary), and
    as a top-K cache gives it for each K: renormalised over the K (soft_kd_kl at T = 1, what 04
    --kd soft minimises) or with a rest bucket. The teacher's log-probs are rounded to float16, as
    02 stores them."""
    exact, n = 0.0, 0
    renorm, rest = {k: 0.0 for k in TOPK}, {k: 0.0 for k in TOPK}
    for x, y in batches(seqs, prompt_lens, batch_size, device):
        with autocast(device, dtype):
            s, t = logits_fp32(student, x), logits_fp32(teacher, x)
        scored = y != -100
        exact += token_divergence(s, t, "fkl")[scored].sum().item()
        log_q, log_p = F.log_softmax(s, -1), F.log_softmax(t, -1)
        for k in TOPK:
            lp, ids = log_p.topk(k, dim=-1)
            lp = lp.half().float()  # what the cache keeps
            renorm[k] += soft_kd_kl(s, ids, lp, T=1.0)[scored].sum().item()
            rest[k] += rest_bucket_kl(log_q, ids, lp)[scored].sum().item()
        n += int(scored.sum())
    return {"exact": exact / n, "renorm": {k: v / n for k, v in renorm.items()},
            "rest": {k: v / n for k, v in rest.items()}}


def own_text(model, seqs, prompt_lens, device, per_prompt):
    """The model continues each held-out prompt itself, per_prompt times, as many tokens as the
    teacher's sample has (fewer if it ends the text), at temperature 1, untruncated (its real
    distribution), with the same seeded generator for every model."""
    g = torch.Generator(device=device).manual_seed(SAMPLE_SEED)
    seqs = [s for s in seqs for _ in range(per_prompt)]
    prompt_lens = [P for P in prompt_lens for _ in range(per_prompt)]
    out = []
    for i in range(0, len(seqs), 64):
        group, P = seqs[i:i + 64], prompt_lens[i:i + 64]
        out += continue_each(model, [s[:p] for s, p in zip(group, P)],
                             [len(s) - p for s, p in zip(group, P)], EOT, temperature=1.0,
                             generator=g)
    return out, prompt_lens


def measure(student, teacher, test, test_P, args, device, dtype):
    """Every number of a table row. The teacher's perplexity of the model's own text comes with its
    spread (+-x%: two standard errors)."""
    sums, counts = held_out_scores(student, teacher, test, test_P, args.batch_size, device, dtype)
    nll, fkl, rkl = (sums.sum(1) / counts.sum()).tolist()  # means over every scored token
    text, P = own_text(student, test, test_P, device, args.own_samples)
    own, own_2se = mean_and_spread(*sample_nll(teacher, text, P, args.batch_size, device, dtype))
    return {"ppl": math.exp(nll), "fkl": fkl, "rkl": rkl, "teacher_ppl_own": math.exp(own),
            "own_spread": math.exp(own_2se) - 1, "distinct_2": distinct_2(text, P),
            "own_tokens": sum(len(t) - p for t, p in zip(text, P))}


def distinct_2(seqs, prompt_lens):
    """Distinct token pairs over all pairs, in the sampled part of each text (1.0: none repeats)."""
    pairs = [tuple(s[j:j + 2].tolist()) for s, P in zip(seqs, prompt_lens)
             for j in range(P, len(s) - 1)]
    return len(set(pairs)) / max(1, len(pairs))


def chart(rows, path):
    """Left: what each method traded (coverage of the teacher's text against how plausible its own
    text is to the teacher); right: what it cost."""
    names = [n for n in rows if n in METHODS]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1.4, 1]})
    colors = dict(zip(names, plt.get_cmap("tab10").colors))
    for name, r in rows.items():
        style = (dict(marker="*", s=180, color="black") if name == "teacher" else
                 dict(marker="s", s=50, color="#999999") if name == "start" else
                 dict(s=60, color=colors[name]))
        ax.scatter(r["ppl"], r["teacher_ppl_own"], zorder=3, **style)
        ax.annotate(name, (r["ppl"], r["teacher_ppl_own"]), xytext=(5, 4),
                    textcoords="offset points", fontsize=8)
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
    bx.barh(names[::-1], [rows[n]["time"] for n in names[::-1]],
            color=[colors[n] for n in names[::-1]])
    bx.set_xlabel("training time (s)")
    bx.set_title("What it costs (same number of steps)")
    bx.grid(axis="x", alpha=0.3)
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
         help="epochs of training for every method, from the start (gpt2: 1, tiny: 2)")
    flag("--methods", default=",".join(METHODS),
         help=f"the methods to run, comma-separated (default: all: {','.join(METHODS)})")
    flag("--batch-size", type=positive_int, default=8, help="sequences per batch when measuring")
    flag("--own-samples", type=positive_int, default=4,
         help="texts each model writes per held-out prompt, graded by the teacher (default: 4)")
    flag("--fresh", action="store_true",
         help="train every method again, even those already trained")
    return parse(p, PRESETS)


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

    # --- inputs: checked here once, so that a problem is one line, not six failed runs ---
    for file, kind in INPUTS.items():
        check_preset(load_artifact(f"{out}/{file}", kind), f"{out}/{file}", args.preset)
    data = load_artifact(f"{out}/generated.pt", "generated", keys=("test", "test_prompt_lens"))
    test, test_P = data["test"], data["test_prompt_lens"]
    teacher, teacher_ckpt = load_model(f"{out}/teacher.pt", "teacher", vocab_size=enc.n_vocab)
    teacher.to(device)

    # --- training: the start, then one 04 run per method from it, each in its own folder ---
    t_lab = time.time()
    start = f"{out}/methods/start/student_last.pt"
    for name in ["start", *chosen]:
        sub = f"{out}/methods/{name.replace(' ', '_')}"
        flags = ["--preset", args.preset, "--out", sub, "--kd", "seq",
                 "--epochs", str(args.warm_epochs)] if name == "start" else \
                ["--preset", args.preset, "--out", sub, "--epochs", str(args.epochs),
                 "--init", start, *METHODS[name]]
        # decide: trained already (keep it), interrupted (resume it), or new (train it)
        plan = plan_run(out, sub, flags, start if name != "start" else None, args.fresh)
        if plan == "done":
            print(f"=== {name}: trained earlier with the same settings, kept ({sub})")
            continue
        resume = ["--resume"] if plan == "resume" else []
        print(f"=== {name}: python 04_train.py {' '.join(flags + resume)}")
        try:
            code, lines = run_04(flags + resume)
        except KeyboardInterrupt:
            raise LessonError(f"interrupted while training {name}: run 07 again to go on "
                              f"(finished methods are kept; this one resumes from its saved "
                              f"state, if it saved one)") from None
        if code:
            said = next((ln.strip() for ln in reversed(lines) if ln.startswith("error:")),
                        f"exit code {code}")
            raise LessonError(f"04_train.py failed for {name} ({said}); the methods trained "
                              f"before it are kept")

    # --- measuring: every student after the same number of steps, on the same held-out samples ---
    n_tokens = sum(len(s) - P for s, P in zip(test, test_P))
    print(f"\nmeasuring on generated-test ({len(test)} samples, {n_tokens:,} sampled tokens; each "
          f"model writes {args.own_samples} texts per prompt) | {device} {dtype}")
    rows, steps, students = {}, {}, {}
    for name in ["teacher", "start", *chosen]:
        if name == "teacher":
            model = teacher
        else:
            sub = f"{out}/methods/{name.replace(' ', '_')}"
            model, _ = load_model(f"{sub}/student_last.pt", "student", vocab_size=enc.n_vocab)
            model.to(device)
            log = load_artifact(f"{sub}/train_log.pt", "train_log")
        rows[name] = r = measure(model, teacher, test, test_P, args, device, dtype)
        if name in METHODS:
            steps[name], r["time"], students[name] = log["step"][-1], log["wall_time"], model
        print(f"  {name:<18} ppl {r['ppl']:7.2f} | KL(t||s) {r['fkl']:.3f} | KL(s||t) "
              f"{r['rkl']:.3f} | teacher ppl of own text {r['teacher_ppl_own']:7.2f} "
              f"(+-{r['own_spread']:.0%}) | distinct-2 {r['distinct_2']:.3f}"
              + (f" | {r['time']:.0f}s" if "time" in r else ""))
    if len(set(steps.values())) > 1:
        raise LessonError(f"the methods trained for different numbers of steps ({steps}): run 07 "
                          f"with --fresh")
    price_of = "soft" if "soft" in students else chosen[0]
    price = price_of_top_k(students[price_of], teacher, test, test_P, args.batch_size, device,
                           dtype)

    # --- the report ---
    md = report_lines(args, rows, price, price_of, steps[chosen[0]], len(test), enc.n_vocab,
                      teacher_ckpt.get("source") or "see teacher.pt")
    save_artifact({"kind": "methods", "preset": args.preset, "rows": rows, "price": price,
                   "price_of": price_of, "steps": steps, "epochs": args.epochs,
                   "warm_epochs": args.warm_epochs}, f"{out}/methods.pt")
    write_text("\n".join(md) + "\n", f"{out}/methods.md")
    chart(rows, f"{out}/methods.png")
    print(f"\nprice of top-K ({price_of} student): exact KL {price['exact']:.4f}; "
          + ", ".join(f"K={k}: {price['renorm'][k]:.4f} renormalised, {price['rest'][k]:.4f} "
                      f"with rest" for k in TOPK))
    print(f"lab finished in {time.time() - t_lab:.0f}s | wrote {out}/methods.md, methods.png, "
          f"methods.pt")


# --- bookkeeping: which runs are done, and the report ---
INPUTS = {"teacher.pt": "teacher", "generated.pt": "generated", "student_init.pt": "student_init"}


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


def report_lines(args, rows, price, price_of, steps, n_test, n_vocab, who):
    """methods.md, line by line: the table, how to read it, the price of a top-K cache."""
    first = next(r for n, r in rows.items() if n in METHODS)
    label = {"teacher": "teacher (reference)", "start": f"start ({args.warm_epochs} epochs of seq)"}
    md = ["# The divergence lab\n",
          f"Teacher: {who}. Every method starts from the same student (student_init.pt after "
          f"{args.warm_epochs} epochs of sequence-level KD) and trains {steps} optimizer steps "
          f"({args.epochs} epochs, seed 1337, 04's other defaults for the {args.preset} preset). "
          f"Measured on the teacher's {n_test} held-out test samples (prompts not scored); own "
          f"text: {args.own_samples} continuations of each test prompt at temperature 1, "
          f"{first['own_tokens']:,} tokens or fewer per model. The first three columns score "
          f"every model on the same tokens; each model's own text is its own, so that column "
          f"carries ±, two standard errors with the texts as the units (tokens of one text are "
          f"not independent).\n",
          "| method | ppl on teacher text | KL(t‖s) | KL(s‖t) | teacher ppl of own text | "
          "distinct-2 | time |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        md.append(f"| {label.get(name, name)} | {r['ppl']:.2f} | {r['fkl']:.3f} | "
                  f"{r['rkl']:.3f} | {r['teacher_ppl_own']:.2f} ±{r['own_spread']:.0%} | "
                  f"{r['distinct_2']:.3f} | " + (f"{r['time']:.0f} s |" if "time" in r else "|"))
    md += ["", "How to read it: the first three numbers ask whether the student covers what the "
           "teacher says (forward KL, what seq, soft and fkl minimise, rewards covering every "
           "continuation); the next two ask whether what the student writes itself is what the "
           "teacher would write, and how varied it is (reverse KL and on-policy training aim "
           "there). A method that wins one side often pays on the other; on-policy times include "
           "the student's sampling.",
           "", f"## The price of a top-K cache (the {price_of} student)\n",
           f"Exact forward KL(teacher ‖ student), full vocabulary: **{price['exact']:.4f}** nats "
           f"per token. What a cache of the teacher's K most likely tokens gives instead (int32 "
           f"id + float16 log-prob = 6 bytes each; the rest bucket needs no extra bytes, since the "
           f"stored log-probs are normalised over the whole vocabulary; the full distribution "
           f"would be {2 * n_vocab:,} bytes a token in float16):\n",
           "| K | bytes per token | renormalised over K (04 --kd soft) | with a rest bucket (a "
           "lower bound) |",
           "|---:|---:|---:|---:|"]
    for k in TOPK:
        md.append(f"| {k} | {6 * k} | {price['renorm'][k]:.4f} | {price['rest'][k]:.4f} |")
    md += ["", "Each method's run is in methods/<method>/ (train_log.pt, student_last.pt); rerun "
           "one by hand with the command 07 printed for it."]
    return md


if __name__ == "__main__":
    run_lesson(main)
