"""Peak memory of the full-vocabulary divergence loss (04 --kd fkl|rkl|jsd), measured on the CPU.

The online kinds hold the student's and the teacher's logits for one micro-batch, (B, L, V) each,
and token_divergence works on them in float32. This measures, in a fresh process per kind, how much
the forward and backward of the loss add at their peak, in units of one float32 (B, L, V) tensor,
for the gpt2 preset's batch (8 x 256 x 50,257: 412 MB a tensor), so the T4 arithmetic in docs/lab.md
rests on a measurement, not a guess. Logits come in as float16 (autocast on a T4) and float32.

Run:    python bench/divergence_memory.py [--batch 8 --length 256]   (needs ~10 GB of RAM)
"""
import argparse
import os
import subprocess
import sys

CHILD = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from common.distill import token_divergence
B, L, V, kind, dtype = {B}, {L}, 50257, {kind!r}, getattr(torch, {dtype!r})
torch.manual_seed(0)
student = torch.randn(B, L, V, dtype=dtype).requires_grad_()
teacher = torch.randn(B, L, V, dtype=dtype)
mask = torch.ones(B, L, dtype=torch.bool)
torch.set_num_threads(2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
token_divergence(student, teacher, kind)[mask].sum().backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    args = p.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    one = args.batch * args.length * 50257 * 4
    print(f"one float32 (B, L, V) tensor, B={args.batch}, L={args.length}: {one / 1e6:.0f} MB")
    for dtype in ("float16", "float32"):
        for kind in ("fkl", "rkl", "jsd"):
            code = CHILD.format(root=root, B=args.batch, L=args.length, kind=kind, dtype=dtype)
            extra = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
            print(f"  logits {dtype:<8} {kind}: peak +{extra / 1e9:.2f} GB = {extra / one:.1f} float32 (B, L, V) tensors "
                  f"(beyond the two logits tensors)")


if __name__ == "__main__":
    main()
