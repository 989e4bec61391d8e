"""The price of a top-K cache: soft KD (04 --kd soft) knows only the teacher's K most likely tokens
per position, stored by 02. On the teacher's held-out samples: the exact forward KL(teacher ||
student) over the whole vocabulary beside what a cache of K tokens gives (renormalised over the K,
or with one bucket for the rest), and where the exact KL comes from, by token group. docs/lab.md
reads the measured table.

Reads:  artifacts/teacher.pt, generated.pt and a student (default: student.pt)
Writes: artifacts/price_of_top_k.md
Run:    python bench/price_of_top_k.py --preset tiny [--student PATH]
        (the lab's measurement: --student artifacts/methods/soft/lr<its rate>-seed1337/student_last.pt)
"""
import os
import sys

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.distill import rest_bucket_kl, soft_kd_kl, token_divergence  # noqa: E402
from common.perplexity import score_sampled  # noqa: E402
from common.plumbing.artifacts import (  # noqa: E402
    check_preset,
    load_artifact,
    load_model,
    run_lesson,
    write_text,
)
from common.plumbing.cli import existing_file, lesson_parser, parse, positive_int  # noqa: E402
from common.plumbing.device import get_device, precision  # noqa: E402
from common.tokenizer import get_tokenizer  # noqa: E402

TOPK = (1, 8, 32, 128)  # cache sizes


def price_of_top_k(student, teacher, seqs, prompt_lens, used, batch_size=8, ks=TOPK, group_k=32):
    """The mean forward KL(teacher || student) on held-out positions: exact, and as a top-K cache
    gives it for each K in ks, renormalised (04 --kd soft at T = 1) or with a rest bucket; and the
    exact KL split by token group: the teacher's top group_k at the position, the other tokens of
    `used` ((V,) bool: those the data uses), the never-used ones. Call it under autocast."""
    # the teacher's log-probs rounded to float16, as 02 stores them; with the mass each side puts
    # on the never-used tokens
    def measure(y, s, t):  # (1 + 2 len(ks) + 4, n): every number below, at each position
        log_p, log_q = F.log_softmax(t, -1), F.log_softmax(s, -1)
        values = [token_divergence(s, t, "fkl")]
        for k in ks:
            lp, ids = log_p.topk(k, dim=-1)
            lp = lp.half().float()  # what the cache keeps
            values += [soft_kd_kl(s, ids, lp, T=1.0), rest_bucket_kl(s, ids, lp)]
        p = log_p.exp()
        term = torch.where(p > 0, p * (log_p - log_q), 0.0)       # (n, V): each token's share
        top = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, log_p.topk(group_k).indices, True)
        never = ~used.to(p.device) & ~top
        values += [(term * top).sum(-1), (term * never).sum(-1), (p * never).sum(-1),
                   (log_q.exp() * never).sum(-1)]
        return torch.stack(values)
    sums, counts = score_sampled([student, teacher], seqs, prompt_lens, measure, batch_size)
    exact, *cache, top, never, p_never, q_never = (sums.sum(1) / counts.sum()).tolist()
    groups = dict(top=top, never=never, p_never=p_never, q_never=q_never,
                  used_rest=exact - top - never)
    return {"exact": exact, "renorm": dict(zip(ks, cache[0::2])),
            "rest": dict(zip(ks, cache[1::2])), "groups": groups, "group_k": group_k}


def report(price, student, n_vocab, preset):
    """price_of_top_k.md: the KL a cache gives against the exact one, and where the exact KL comes
    from, by token group."""
    g, k = price["groups"], price["group_k"]
    md = [f"# The price of a top-K cache ({student})\n",
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
    p = lesson_parser(__doc__)
    p.add_argument("--student", type=existing_file, help="the student (default: student.pt)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per batch")
    args = parse(p)
    out, path = args.out, args.student or f"{args.out}/student.pt"
    enc, prec = get_tokenizer(), precision(get_device())
    device = prec.device
    teacher, ckpt = load_model(f"{out}/teacher.pt", "teacher", vocab_size=enc.n_vocab)
    check_preset(ckpt, f"{out}/teacher.pt", args.preset)
    student = load_model(path, "student")[0].to(device)
    data = load_artifact(f"{out}/generated.pt", "generated",
                         keys=("train", "test", "test_prompt_lens"))
    used = torch.zeros(enc.n_vocab, dtype=torch.bool)
    for s in data["train"]:
        used[s] = True  # the tokens the teacher's training text uses
    teacher.to(device)
    with prec.autocast():
        price = price_of_top_k(student, teacher, data["test"], data["test_prompt_lens"], used,
                               args.batch_size)
    price["never_zero"] = bool(teacher.transformer.wte.weight[~used.to(device)].abs().max() == 0)
    price["n_never"] = int((~used).sum())
    md = report(price, os.path.relpath(path, out), enc.n_vocab, args.preset)
    write_text("\n".join(md) + "\n", f"{out}/price_of_top_k.md")
    print("\n".join(md))
    print(f"wrote {out}/price_of_top_k.md")


if __name__ == "__main__":
    run_lesson(main)
