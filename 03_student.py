"""Lesson 03: the student. Build a smaller GPT with the same vocabulary and context as the teacher
(6 layers, 512 wide, 8 heads against GPT-2's 12 / 768 / 12), initialised as GPT-2 was, and compare
the two side by side: parameters, size on disk, compression. With --from-teacher the student
starts from the teacher's own weights instead, as DistilBERT and DistilGPT2 did (Sanh et al.,
2019): every other block, the embeddings and the final LayerNorm copied. Its width is then the
teacher's, so it is smaller only by depth: half the blocks, but the same embedding matrix.

Reads:  artifacts/teacher.pt
Writes: artifacts/student_init.pt  (as teacher.pt: {"kind": "student_init", "config", "model"})
Run:    python 03_student.py              (add --preset tiny for the tiny course)
"""
import torch

from common.model import GPT, GPTConfig
from common.plumbing.artifacts import (
    LessonError,
    check_preset,
    load_model,
    model_checkpoint,
    run_lesson,
    save_artifact,
)
from common.plumbing.cli import lesson_parser, parse, positive_int
from common.tokenizer import get_tokenizer

# --- settings (flags left unset take the preset's values) ---
PRESETS = {
    "gpt2": dict(n_layer=6, n_embd=512, n_head=8),
    "tiny": dict(n_layer=2, n_embd=32, n_head=2),  # the tiny teacher: 2 layers, 64 wide, 4 heads
}


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


def main():
    p = lesson_parser(__doc__)
    p.add_argument("--n-layer", type=positive_int, help="transformer blocks (gpt2: 6, tiny: 2)")
    p.add_argument("--n-embd", type=positive_int, help="width (gpt2: 512, tiny: 32)")
    p.add_argument("--n-head", type=positive_int, help="attention heads (gpt2: 8, tiny: 2)")
    p.add_argument("--seed", type=int, default=1337, help="seed for the initial weights")
    p.add_argument("--from-teacher", action="store_true",
                   help="copy every other block of the teacher, and its embeddings, into a "
                        "student of the teacher's width and half its depth (--n-layer, --n-embd "
                        "and --n-head are ignored)")
    args = parse(p, PRESETS)
    if args.n_embd % args.n_head:
        raise LessonError(f"--n-embd {args.n_embd} must be divisible by --n-head {args.n_head}")

    teacher, ckpt = load_model(f"{args.out}/teacher.pt", "teacher",
                               vocab_size=get_tokenizer().n_vocab)
    check_preset(ckpt, f"{args.out}/teacher.pt", args.preset)
    t = teacher.config

    # --- the student: same tokenizer and context as the teacher, fewer and narrower layers ---
    torch.manual_seed(args.seed)
    if args.from_teacher:
        student = every_other_block(teacher)
    else:
        config = GPTConfig(block_size=t.block_size, vocab_size=t.vocab_size,
                           n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
        # GPT-2's init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)
        student = GPT(config)

    # --- side by side ---
    def row(name, f):
        print(f"{name:<28}{f(teacher):>16}{f(student):>16}")

    print(f"{'':<28}{'teacher':>16}{'student':>16}")
    row("parameters", lambda m: f"{m.num_params() / 1e6:.1f}M")
    row("  without embeddings", lambda m: f"{m.num_params(embeddings=False) / 1e6:.2f}M")
    row("layers", lambda m: m.config.n_layer)
    row("width (n_embd)", lambda m: m.config.n_embd)
    row("heads (head size)", lambda m: f"{m.config.n_head} ({m.config.n_embd // m.config.n_head})")
    row("context / vocabulary", lambda m: f"{m.config.block_size} / {m.config.vocab_size}")
    row("size on disk, fp32", lambda m: f"{m.num_params() * 4 / 1e6:.0f} MB")
    row("size on disk, fp16", lambda m: f"{m.num_params() * 2 / 1e6:.0f} MB")
    ratio = teacher.num_params() / student.num_params()
    body = teacher.num_params(embeddings=False) / student.num_params(embeddings=False)
    print(f"compression: {ratio:.1f}x fewer parameters ({body:.1f}x in the transformer blocks; the "
          f"{t.vocab_size:,}-token embedding is a large share of a small model)")
    if ratio <= 1:
        print("  NOTE: this student is not smaller than its teacher")

    path = f"{args.out}/student_init.pt"
    save_artifact(model_checkpoint(student, "student_init", seed=args.seed, preset=args.preset,
                                   teacher_source=ckpt.get("source"),
                                   from_teacher=args.from_teacher), path)
    print(f"wrote {path}")


if __name__ == "__main__":
    run_lesson(main)
