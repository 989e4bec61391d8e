"""Time the whole course at the seed's scale: a GPT-2 124M-shaped teacher (random weights: speed
does not depend on their values), 500 samples x 256 new tokens, the 6/512/8 student, 3 epochs,
evaluation.

It runs the real lessons 02-06 as subprocesses (lesson 01 needs the internet, so the teacher.pt is
written directly) and reports each lesson's wall time and throughput. On a GPU the lessons use AMP
as they always do, and training MFU is reported against the GPU's peak for the dtype used. On a CPU,
--scale shrinks the number of samples to keep the run short (the shapes stay the same).
Run: python bench/course_speed.py [--scale 0.02] [--out DIR]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common.model import GPT, GPTConfig  # noqa: E402
from common.plumbing.artifacts import load_artifact, model_checkpoint, save_artifact  # noqa: E402

# Dense tensor-core peak TFLOP/s in bf16/fp16 (vendor data sheets, without sparsity), by the name
# torch.cuda.get_device_name() gives: whole words, the variant first ("H100 PCIe" before "H100";
# "L4" is not "L40S"). A GPU not listed gets no MFU rather than another GPU's peak.
PEAKS = [(r"\bH200\b", 989), (r"\bH100\b.*\bPCIe\b", 756), (r"\bH100\b.*\bNVL\b", 835),
         (r"\bH100\b", 989), (r"\bA100\b", 312), (r"\bL40S\b", 362), (r"\bL40\b", 181),
         (r"\bL4\b", 121), (r"\bA10\b", 125), (r"\bT4\b", 65), (r"\bV100\b.*\bPCIE\b", 112),
         (r"\bV100\b", 125)]


def peak_tflops(name, dtype):
    """The GPU's dense peak for dtype (bf16 needs compute capability 8.0: none before), or None."""
    if dtype not in ("bf16", "fp16") or (dtype == "bf16" and re.search(r"\b(T4|V100)\b", name)):
        return None
    return next((peak for pattern, peak in PEAKS if re.search(pattern, name, re.IGNORECASE)), None)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=float, default=None, help="share of the 500 samples (default: 1 on a GPU, 0.02 on a CPU)")
    p.add_argument("--out", default=None, help="artifact folder (default: a temporary one)")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    scale = args.scale if args.scale is not None else (1.0 if cuda else 0.02)
    out = args.out or tempfile.mkdtemp(prefix="course_speed_")
    n_samples = max(4, round(500 * scale))
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"course at scale {scale} ({n_samples} samples x 256 new tokens) on {device} | torch {torch.__version__} | "
          f"{time.strftime('%Y-%m-%d')} | artifacts in {out}")

    torch.manual_seed(0)
    save_artifact(model_checkpoint(GPT(GPTConfig()), "teacher", source="random GPT-2 124M (timing only)",
                                   language="english"), f"{out}/teacher.pt")
    lessons = [("02_generate.py", ["--num-samples", str(n_samples)]), ("03_student.py", []), ("04_train.py", []),
               ("05_evaluate.py", ["--no-wikitext"]), ("06_compare.py", [])]
    times = {}
    for lesson, extra in lessons:
        t0 = time.time()
        r = subprocess.run([sys.executable, lesson, "--out", out, *extra], cwd=ROOT, capture_output=True, text=True)
        times[lesson] = time.time() - t0
        if r.returncode != 0:
            sys.exit(f"{lesson} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        print(f"  {lesson:<15} {times[lesson]:7.1f}s")

    gen = load_artifact(f"{out}/generated.pt", "generated")
    log = load_artifact(f"{out}/train_log.pt", "train_log")
    student = GPT(GPTConfig(n_layer=6, n_head=8, n_embd=512))
    n = student.num_params() - student.transformer.wpe.weight.numel()
    mean_len = sum(len(s) for s in gen["train"]) / len(gen["train"])
    flops = log["tokens"] * (6 * n + 12 * 6 * 512 * mean_len)  # forward + backward, attention included
    print(f"generation: {gen['tokens_per_second']:,.0f} new tokens/s | training: {log['tokens'] / log['wall_time']:,.0f} "
          f"tokens/s ({log['dtype']}, {len(log['loss'])} steps in {log['wall_time']:.1f}s, "
          f"{flops / log['wall_time'] / 1e12:.2f} TFLOP/s)")
    if cuda:
        peak = peak_tflops(torch.cuda.get_device_name(), log["dtype"])
        if peak:
            print(f"training MFU: {flops / log['wall_time'] / 1e12 / peak:.1%} of {peak} TFLOP/s ({log['dtype']})")
    state_mb = os.path.getsize(f"{out}/train_state.pt") / 1e6
    print(f"04's saves: train_state.pt {state_mb:,.0f} MB, written {len(log['val']) - 1} times (each epoch end) in "
          f"{log.get('save_seconds', 0):.1f}s of the {log['wall_time']:.1f}s of training")
    print(f"whole course (02-06): {sum(times.values()):.1f}s")


if __name__ == "__main__":
    main()
