"""Where the work runs, and in which precision: decided here, in one place."""
import contextlib

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

    auto: bf16 on GPUs that support it (Ampere and newer: same range as fp32, no loss scaling needed),
    fp16 on older GPUs such as Colab's T4 (needs a GradScaler, see needs_scaler), fp32 on the CPU
    (CPU autocast only pays off on chips with bf16 matrix units).
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
