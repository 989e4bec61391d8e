"""What lesson 04 trains on, checked before any training: the teacher's samples (generated.pt), the
starting student and, for the online kinds of KD, the teacher itself. Whatever does not fit is
refused in one line that says what to do."""
import torch

from common.model import GPT, GPTConfig
from common.plumbing.artifacts import LessonError, check_preset, load_artifact, load_model
from common.tokenizer import get_tokenizer


def load_generated(path, preset, cache=None):
    """generated.pt's dict; cache "topk" or "sampled": that cache of the teacher's must be there."""
    data = load_artifact(path, "generated",
                         keys=("train", "val", "train_prompt_lens", "val_prompt_lens"))
    check_preset(data, path, preset)
    if cache == "topk" and not data.get("train_topk_ids"):
        raise LessonError("--kd soft needs the teacher's top-K log-probs: run 02_generate.py with "
                          "--topk-logits 32")
    if cache == "sampled" and not data.get("train_sampled_ids"):
        raise LessonError("--soft-tail sampled needs the teacher's sampled cache: run "
                          "02_generate.py with --cache-draws 32")
    return data


def longest_sample(data):
    """The most positions any sample of generated.pt feeds a model."""
    return max(len(s) for s in data["train"] + data["val"]) - 1


def load_student(path, preset, dropout, longest):
    """(the starting student, its checkpoint): any GPT the course can load may start (03's student,
    a trained one, a pretrained GPT-2 of any size written by 01), rebuilt with dropout if asked."""
    student, ckpt = load_model(path, ("student_init", "student", "teacher"))
    vocab = get_tokenizer().n_vocab
    if student.config.vocab_size != vocab:
        raise LessonError(f"{path} has a vocabulary of {student.config.vocab_size} tokens, "
                          f"the teacher's text is in GPT-2's {vocab}: a student must read the "
                          f"teacher's tokens, so start from a model with GPT-2's tokenizer")
    if dropout:  # rebuilt with dropout switched on; the weights are the same
        student = GPT(GPTConfig.from_dict({**ckpt["config"], "dropout": dropout}))
        student.load_state_dict(ckpt["model"])
    check_preset(ckpt, path, preset)
    if longest > student.config.block_size:
        raise LessonError(f"generated.pt holds samples of {longest} tokens, longer than the "
                          f"student's context ({student.config.block_size}): run 02_generate.py "
                          f"with a smaller --max-new-tokens")
    return student, ckpt


def load_teacher(path, longest, prec):
    """The teacher beside the student (the online kinds): in eval mode, without gradients, its
    weights in half precision on a GPU (its logits are taken in float32)."""
    teacher, _ = load_model(path, "teacher", vocab_size=get_tokenizer().n_vocab)
    if teacher.config.block_size < longest:
        raise LessonError(f"the teacher's context ({teacher.config.block_size}) is shorter than "
                          f"the samples")
    teacher.requires_grad_(False)
    cuda = prec.device.startswith("cuda")  # (a CPU computes bf16 and fp16 slower than fp32)
    return teacher.to(device=prec.device, dtype=prec.torch_dtype if cuda else torch.float32)
