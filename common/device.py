"""Where the work runs, and in which precision: decided here, in one place."""
import contextlib
import ctypes
import platform
import sys

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def get_device():
    """The fastest device available: a CUDA GPU, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device, requested="auto"):
    """The training/inference precision: 'fp32', 'bf16' or 'fp16'.

    auto: bf16 on GPUs that support it (Ampere and newer: same range as fp32, no loss scaling
    needed), fp16 on older GPUs such as Colab's T4 (needs a GradScaler, see needs_scaler), fp32 on
    the CPU (CPU autocast only pays off on chips with bf16 matrix units).
    """
    if requested != "auto":
        return requested
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def needs_scaler(dtype):
    """fp16 gradients underflow to zero without loss scaling; bf16 and fp32 have fp32's range."""
    return dtype == "fp16"


def autocast(device, dtype):
    """Mixed-precision context: matmuls in dtype, reductions in fp32; a no-op for fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[dtype])


def sync(device):
    """Wait for queued GPU work, so that a timer measures the work and not just its launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def fused_adamw(device):
    """Whether torch.optim.AdamW can update all parameters in one fused kernel here: on CUDA, and on
    the CPU from torch 2.4. Measured on a 2-core CPU for the student's 45M parameters: 43 ms a step
    against 137 ms for the default per-parameter loop."""
    if device.startswith("cuda"):
        return True
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return device == "cpu" and (major, minor) >= (2, 4)


def keep_freed_memory():
    """On Linux, make malloc keep freed memory for reuse instead of handing it back to the system.

    glibc's malloc serves every request above 32 MB with fresh pages from the kernel and returns
    them on free. Training on the CPU makes tensors that big every step (the student's logits at
    batch 4 x 256 are 1,024 x 50,257 floats, 206 MB), and the first write to each fresh 4 KB page is
    a page fault: a third of a training step, measured on a 2-core CPU (bench/bench_cpu.py). Telling
    malloc never to use fresh mappings (M_MMAP_MAX = 0) and to keep up to 2 GB of freed memory
    (M_TRIM_THRESHOLD) makes the next step reuse the same pages. The cost: the process holds on to
    its peak memory until it exits. Returns whether the setting took (False on macOS, Windows,
    musl).
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
