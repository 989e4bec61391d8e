"""How noisy is on-policy distillation from sampled tokens (04 --kd rkl-sampled), and how much
does vOPD's baseline (04 --kd rkl-vopd: the exact reverse KL at the position subtracted from the
reward) take away?

On the student's own texts (continuing training prompts, at temperature 1), the gradient of 04's
rkl-sampled and rkl-vopd losses (one sampled token a position) against the gradient of the exact
per-position reverse KL (04's rkl, the full vocabulary) on the same batch: their cosine, 5 batches
each of 4 texts (the lab's micro-batch on the tiny preset), 16 and 64. Then, for each student file given,
lesson 07's val objective of the two reverse-KL methods: the exact reverse KL on the student's own
continuations of the val prompts (lower is better).

Run:    python bench/sampled_rkl_noise.py artifacts [more/student_last.pt ...]
        (after the tiny course and lesson 07: it starts from methods/start/student_last.pt)
"""
import importlib.util
import os
import sys

import torch
from torch.nn import functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common.data import make_batch  # noqa: E402
from common.distill import KD, loss_sums  # noqa: E402
from common.model import logits_fp32  # noqa: E402
from common.plumbing.artifacts import load_artifact, load_model  # noqa: E402
from common.plumbing.device import Precision  # noqa: E402
from common.sampling import continue_each  # noqa: E402
from common.tokenizer import EOT  # noqa: E402


def lesson(file):
    spec = importlib.util.spec_from_file_location(file[:2], os.path.join(ROOT, file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    out, students = sys.argv[1], sys.argv[2:]
    L07 = lesson("07_methods.py")
    teacher, _ = load_model(f"{out}/teacher.pt", "teacher")
    data = load_artifact(f"{out}/generated.pt", "generated")
    start = f"{out}/methods/start/student_last.pt"
    for B in (4, 16, 64):
        cosines = {"rkl-sampled": [], "rkl-vopd": []}
        for rep in range(5):
            student, _ = load_model(start, "student")
            g = torch.Generator().manual_seed(rep)
            idx = torch.randperm(len(data["train"]), generator=g)[:B].tolist()
            seqs = [data["train"][k] for k in idx]
            P = [data["train_prompt_lens"][k] for k in idx]
            own = continue_each(student, [s[:p] for s, p in zip(seqs, P)],
                                [len(s) - p for s, p in zip(seqs, P)], EOT, 1.0, generator=g)
            x, y = make_batch(own, prompt_lens=P)
            with torch.no_grad():
                teacher_logits = logits_fp32(teacher, x)
            grads = {}
            for kd in ("rkl", "rkl-sampled", "rkl-vopd"):
                student.zero_grad()
                loss, _ = loss_sums(student(x)[0], y, KD(kd), teacher_logits=teacher_logits)
                loss.backward()
                grads[kd] = torch.cat([p.grad.flatten() for p in student.parameters()])
            for kd in cosines:
                cosines[kd].append(F.cosine_similarity(grads[kd], grads["rkl"], dim=0).item())
        for kd, values in cosines.items():
            print(f"batch of {B:2d} texts: cosine({kd}, exact) "
                  + " ".join(f"{c:.2f}" for c in values))
    args = type("Args", (), {"batch_size": 8})()
    for path in [start, *students]:
        student, _ = load_model(path, "student")
        objective = L07.val_objective(L07.METHODS["rkl+on-policy 1"], student, teacher, data,
                                      args, Precision("cpu", "fp32"))
        print(f"{path}: exact reverse KL on its own val continuations {objective:.4f}")


if __name__ == "__main__":
    main()
