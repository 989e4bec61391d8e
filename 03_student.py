"""Lesson 03: the student. Build a smaller GPT with the same vocabulary and context as the teacher
(6 layers, 512 wide, 8 heads against GPT-2's 12 / 768 / 12), initialised as GPT-2 was, and compare
the two side by side: parameters, size on disk, compression. Two other starts reuse the teacher:
--from-teacher copies every other block at the teacher's width (DistilBERT, DistilGPT2: Sanh et
al., 2019); --prune cuts the student's shape out of the teacher, keeping the heads, MLP neurons,
residual channels and blocks that matter most on calibration text (Minitron: Muralidharan et al.,
2024), and checks that the scores matter: the most important units against random or the least.

Reads:  artifacts/teacher.pt (and generated.pt with --prune: 02's texts calibrate the scores)
Writes: artifacts/student_init.pt  (as teacher.pt: {"kind": "student_init", "config", "model"})
Run:    python 03_student.py              (add --preset tiny for the tiny course)
"""
import math
from functools import partial

import torch
from torch.nn import functional as F

from common.data import batches
from common.model import GPT, GPTConfig
from common.plumbing.artifacts import (
    LessonError,
    check_preset,
    load_artifact,
    load_model,
    model_checkpoint,
    run_lesson,
    save_artifact,
)
from common.plumbing.cli import lesson_parser, parse, positive_float, positive_int
from common.plumbing.device import get_device
from common.prune import choose, cut, hidden_skipping
from common.tokenizer import get_tokenizer

# --- settings (flags left unset take the preset's values) ---
# init_std: GPT-2's 0.02 suits its 768-wide layers. A linear layer scales its input's size by about
# sqrt(width) x std: 0.55 at 768 wide and 0.02, 0.11 at the tiny student's 32. Its attention then
# starts blind, and it sat near perplexity 80 for one to three of its six epochs, for as long as the
# seed and the CPU's rounding said (student after training 3.8-7.6 over 6 seeds). 0.1 keeps
# GPT-2's gain per layer at 32 wide (0.02 x sqrt(768 / 32)): 3.6-3.7 over the same seeds
# (docs/results.md).
PRESETS = {
    "gpt2": dict(n_layer=6, n_embd=512, n_head=8, init_std=0.02),
    "tiny": dict(n_layer=2, n_embd=32, n_head=2, init_std=0.1),  # the tiny teacher: 2 x 64, 4 heads
}
CALIBRATION = 8 * 8  # --prune: texts of 02's train split the scores are measured on (8 batches)
HELD_OUT = 64        # texts of 02's val split the pruned students are compared on


def every_other_block(teacher):
    """A student of the teacher's width with blocks 0, 2, 4, ... of the teacher, and its token and
    position embeddings and final LayerNorm: the DistilBERT initialisation."""
    t = teacher.config
    config = GPTConfig(**{**t.__dict__, "n_layer": max(1, t.n_layer // 2)})
    student = GPT(config)
    ours = student.state_dict()
    for name, value in teacher.state_dict().items():
        if name.startswith("transformer.h."):  # transformer.h.<i>.…: block i goes to i // 2
            _, _, i, rest = name.split(".", 3)
            if int(i) % 2 == 0 and int(i) // 2 < config.n_layer:
                ours[f"transformer.h.{int(i) // 2}.{rest}"].copy_(value)
        else:
            ours[name].copy_(value)
    return student


# --- pruning: score every unit of the teacher on calibration text, keep the most important ---
@torch.no_grad()
def importance(teacher, batch_list):
    """Minitron's activation-based scores, means over the real positions of batch_list [(x, y)]:
    heads (L, n_head), neurons (L, 4C), channels (C,); and blocks (L,), the loss when skipped."""
    L, nh, C = teacher.config.n_layer, teacher.config.n_head, teacher.config.n_embd
    zeros = partial(torch.zeros, device=teacher.lm_head.weight.device)
    score = dict(heads=zeros(L, nh), neurons=zeros(L, 4 * C), channels=zeros(C))
    real = None  # (B, T): positions that are text, not padding

    def add(key, layer=None, of_input=False, per_unit=torch.abs):  # a hook summing over `real`
        def hook(module, inputs, output):
            units = per_unit(inputs[0] if of_input else output)[real]  # (n, units)
            (score[key] if layer is None else score[key][layer]).add_(units.sum(0))
        return hook

    head_norms = lambda y: y.unflatten(-1, (nh, C // nh)).norm(dim=-1)  # (B, T, nh): ||head out||
    hooks = [teacher.transformer.ln_f.register_forward_hook(add("channels"))]
    for i, b in enumerate(teacher.transformer.h):
        hooks += [b.ln_1.register_forward_hook(add("channels")),  # |LayerNorm out|, all three
                  b.ln_2.register_forward_hook(add("channels")),
                  b.attn.c_proj.register_forward_hook(add("heads", i, True, head_norms)),
                  b.mlp.c_proj.register_forward_hook(add("neurons", i, True))]  # |GELU out|
    n = 0
    try:
        for x, y in batch_list:
            real = y != -100
            teacher(x)
            n += int(real.sum())
    finally:
        for h in hooks:
            h.remove()
    score = {k: v.cpu() / n for k, v in score.items()}
    # a block's importance: the calibration loss without it, what the student will be judged on.
    # Not 1 - cos(input, output): how far a block turns the stream is not how much the loss needs it
    score["blocks"] = torch.tensor([loss_on(teacher, batch_list, skip=i) for i in range(L)])
    return score


@torch.no_grad()
def loss_on(model, batch_list, skip=None):
    """The mean next-token loss over batch_list [(x, y)], block `skip` left out (None: none)."""
    total, n = 0.0, 0
    for x, y in batch_list:
        logits = model.lm_head(hidden_skipping(model, x, skip))
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        n += int((y != -100).sum())
    return total / n


def pruned(teacher, score, shape, how="top", generator=None):
    """The student of this shape (layers, heads, width) cut out of the teacher, keeping the units
    `how` picks by score: the most important ("top"), the least ("bottom") or random ones
    ("random")."""
    n_layer, n_head, n_embd = shape
    keep = partial(choose, how=how, generator=generator)
    layers = keep(score["blocks"], n_layer)  # the highest loss when skipped: the most needed
    return cut(teacher, layers, [keep(score["heads"][i], n_head) for i in layers],
               [keep(score["neurons"][i], 4 * n_embd) for i in layers],
               keep(score["channels"], n_embd))


def check_prunable(args, t):
    """A shape that can be cut out of the teacher t, or a one-line refusal."""
    hs = t.n_embd // t.n_head
    for flag, want, most in (("--n-layer", args.n_layer, t.n_layer), ("--n-embd", args.n_embd,
                             t.n_embd), ("--n-head", args.n_head, t.n_head)):
        if want > most:
            raise LessonError(f"--prune keeps units of the teacher: {flag} {want} is more than its "
                              f"{most}")
    if args.n_embd != args.n_head * hs:
        raise LessonError(f"--prune keeps whole heads of the teacher's size {hs}: --n-embd must be "
                          f"--n-head x {hs} = {args.n_head * hs}, not {args.n_embd}")


def prune(teacher, args):
    """The pruned student, after showing what it kept and how it scores before any training."""
    check_prunable(args, teacher.config)
    data = load_artifact(f"{args.out}/generated.pt", "generated",
                         keys=("train", "val", "val_prompt_lens"))
    calib, device = data["train"][:CALIBRATION], get_device()  # fp32: scores, not speed
    # every token scored (prompt length 1): calibration is just text
    calibration = list(batches(calib, [1] * len(calib), 8, device))
    score = importance(teacher.to(device), calibration)
    shape = (args.n_layer, args.n_head, args.n_embd)
    student = pruned(teacher, score, shape)
    t = teacher.config
    print(f"importance on {len(calib)} texts of generated.pt's train split (loss "
          f"{loss_on(teacher, calibration):.3f}):")
    print("  blocks, the loss when skipped: "
          + ", ".join(f"{i}: {v:.3f}" for i, v in enumerate(score["blocks"].tolist())))
    layers = choose(score["blocks"], args.n_layer).tolist()
    print(f"  kept: blocks {layers} of {t.n_layer}, {args.n_head} heads of {t.n_head} and "
          f"{4 * args.n_embd} MLP neurons of {4 * t.n_embd} in each, {args.n_embd} channels of "
          f"{t.n_embd}")
    # the check that the scores matter: the same shape with other units kept, on held-out text
    val, P = data["val"][:HELD_OUT], data["val_prompt_lens"][:HELD_OUT]
    held_out = list(batches(val, P, 8, device))  # the sampled tokens scored, not the prompts
    g = torch.Generator().manual_seed(args.seed)
    rows = {"teacher": teacher, "pruned: the most important": student,
            "random units kept": pruned(teacher, score, shape, "random", g),
            "the least important kept": pruned(teacher, score, shape, "bottom"),
            "random init (no teacher)": GPT(student.config).to(device)}
    print(f"perplexity on {len(val)} held-out texts (02's val split), before any training:")
    for name, model in rows.items():
        print(f"  {name:<28}{math.exp(loss_on(model.eval(), held_out)):>12,.2f}")
    teacher.cpu()
    return student.cpu()


def main():
    p = lesson_parser(__doc__)
    p.add_argument("--n-layer", type=positive_int, help="transformer blocks (gpt2: 6, tiny: 2)")
    p.add_argument("--n-embd", type=positive_int, help="width (gpt2: 512, tiny: 32)")
    p.add_argument("--n-head", type=positive_int, help="attention heads (gpt2: 8, tiny: 2)")
    p.add_argument("--init-std", type=positive_float,
                   help="std of the random initial weights (gpt2: 0.02, GPT-2's own; tiny: 0.1)")
    p.add_argument("--seed", type=int, default=1337, help="seed for the initial weights")
    p.add_argument("--from-teacher", action="store_true",
                   help="copy every other block of the teacher and its embeddings: the teacher's "
                        "width, half its depth (--n-layer, --n-embd and --n-head are ignored)")
    p.add_argument("--prune", action="store_true",
                   help="cut the student out of the teacher: its blocks, heads, neurons and "
                        "channels that matter most on 02's texts")
    args = parse(p, PRESETS)
    if args.prune and args.from_teacher:
        raise LessonError("choose one start: --from-teacher or --prune")
    if args.n_embd % args.n_head:
        raise LessonError(f"--n-embd {args.n_embd} must be divisible by --n-head {args.n_head}")

    enc = get_tokenizer()
    teacher, ckpt = load_model(f"{args.out}/teacher.pt", "teacher", vocab_size=enc.n_vocab)
    check_preset(ckpt, f"{args.out}/teacher.pt", args.preset)
    t = teacher.config

    # --- the student: same tokenizer and context as the teacher, fewer and narrower layers ---
    torch.manual_seed(args.seed)
    if args.from_teacher:
        student = every_other_block(teacher)
    elif args.prune:
        student = prune(teacher, args)
    else:  # GPT-2's init: N(0, init_std), residual projections scaled by 1/sqrt(2 * n_layer)
        student = GPT(GPTConfig(block_size=t.block_size, vocab_size=t.vocab_size,
                                n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                                init_std=args.init_std))

    # --- side by side ---
    def row(name, f):
        print(f"{name:<28}{f(teacher):>16}{f(student):>16}")
    print(f"{'':<28}{'teacher':>16}{'student':>16}")
    row("parameters", lambda m: f"{m.num_params() / 1e6:.1f}M")
    row("  without embeddings", lambda m: f"{m.num_params(embeddings=False) / 1e6:.2f}M")
    row("layers x width (n_embd)", lambda m: f"{m.config.n_layer} x {m.config.n_embd}")
    row("heads (head size)", lambda m: f"{m.config.n_head} ({m.config.n_embd // m.config.n_head})")
    row("context / vocabulary", lambda m: f"{m.config.block_size} / {m.config.vocab_size}")
    row("MB on disk (fp32; fp16 half)", lambda m: f"{m.num_params() * 4e-6:.0f}")
    ratio = teacher.num_params() / student.num_params()
    body = teacher.num_params(embeddings=False) / student.num_params(embeddings=False)
    print(f"compression: {ratio:.1f}x fewer parameters ({body:.1f}x in the transformer blocks; the "
          f"{t.vocab_size:,}-token embedding is a large share of a small model)")
    if ratio <= 1:
        print("  NOTE: this student is not smaller than its teacher")
    path = f"{args.out}/student_init.pt"
    save_artifact(model_checkpoint(student, "student_init", seed=args.seed, preset=args.preset,
                                   teacher_source=ckpt.get("source"),
                                   from_teacher=args.from_teacher, pruned=args.prune), path)
    print(f"wrote {path}")


if __name__ == "__main__":
    run_lesson(main)
