"""What lesson 04 trains on, checked before any training: the teacher's samples (generated.pt), the
starting student and, for the online kinds of KD, the teacher itself. Whatever does not fit the
flags is refused in one line that says what to do."""
import torch

from common.distill import ONLINE
from common.model import GPT, GPTConfig
from common.plumbing.artifacts import LessonError, check_preset, load_artifact, load_model
from common.tokenizer import get_tokenizer

# the kinds that need the teacher online (its full distributions; rkl-sampled: one log-prob a token)


def load_inputs(args, device, dtype):
    """(generated.pt's dict, the starting student, its checkpoint, the teacher or None). The student
    is rebuilt with --dropout if asked; the teacher, for fkl, rkl and jsd, is in eval mode, without
    gradients, its weights in half precision on a GPU (its logits are taken in float32)."""
    data = load_artifact(f"{args.out}/generated.pt", "generated",
                         keys=("train", "val", "train_prompt_lens", "val_prompt_lens"))
    init_path = args.init or f"{args.out}/student_init.pt"
    # any GPT the course can load may start: 03's student, a trained one, or a pretrained GPT-2
    # of any size written by 01 (python 01_teacher.py --model gpt2 --out DIR: DIR/teacher.pt)
    student, ckpt = load_model(init_path, ("student_init", "student", "teacher"))
    vocab = get_tokenizer().n_vocab
    if student.config.vocab_size != vocab:
        raise LessonError(f"{init_path} has a vocabulary of {student.config.vocab_size} tokens, "
                          f"the teacher's text is in GPT-2's {vocab}: a student must read the "
                          f"teacher's tokens, so start from a model with GPT-2's tokenizer")
    if args.dropout:  # rebuild with dropout switched on; the weights are the same
        student = GPT(GPTConfig.from_dict({**ckpt["config"], "dropout": args.dropout}))
        student.load_state_dict(ckpt["model"])
    check_preset(data, f"{args.out}/generated.pt", args.preset)
    check_preset(ckpt, init_path, args.preset)
    longest = max(len(s) for s in data["train"] + data["val"]) - 1
    if longest > student.config.block_size:
        raise LessonError(f"generated.pt holds samples of {longest} tokens, longer than the "
                          f"student's context ({student.config.block_size}): run 02_generate.py "
                          f"with a smaller --max-new-tokens")
    if args.kd == "soft" and not data.get("train_topk_ids"):
        raise LessonError("--kd soft needs the teacher's top-K log-probs: run 02_generate.py with "
                          "--topk-logits 32")
    if args.kd == "jsd" and not 0 < args.jsd_beta < 1:
        raise LessonError(f"--jsd-beta must be strictly between 0 and 1 (got {args.jsd_beta}); 0 "
                          f"and 1 are --kd fkl and --kd rkl in the limit")
    if args.on_policy and args.kd not in ONLINE:
        raise LessonError(f"--on-policy needs the teacher online to grade the student's text: use "
                          f"it with --kd {', '.join(ONLINE)}, not --kd {args.kd} (which train on "
                          f"the teacher's stored samples)")
    if args.kd == "rkl-sampled" and (args.on_policy != 1 or args.on_policy_temperature != 1):
        raise LessonError("--kd rkl-sampled needs --on-policy 1 (and --on-policy-temperature 1): "
                          "its estimate of the reverse KL is unbiased only on tokens the student "
                          "drew from itself")
    if args.soft_tail == "rest" and (args.kd != "soft" or args.kd_temperature != 1):
        raise LessonError("--soft-tail rest needs --kd soft and --kd-temperature 1: the stored "
                          "log-probs give the teacher's rest mass at T = 1 only")
    if args.kd not in ONLINE:
        return data, student, ckpt, None
    teacher, _ = load_model(f"{args.out}/teacher.pt", "teacher",
                            vocab_size=student.config.vocab_size)
    if teacher.config.block_size < longest:
        raise LessonError(f"the teacher's context ({teacher.config.block_size}) is shorter than "
                          f"the samples")
    teacher.requires_grad_(False)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype)
    teacher.to(device=device, dtype=half if half and device.startswith("cuda") else torch.float32)
    return data, student, ckpt, teacher
