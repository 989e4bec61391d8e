"""Where the work runs, and in which precision: decided here, in one place."""
import contextlib
import ctypes
import platform
import sys

import torch

from common.plumbing.errors import LessonError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def get_device():
    """The fastest device available: a CUDA GPU, then Apple's MPS, then the CPU. A GPU this torch
    has no kernels for is refused in one line (it would pass is_available() and fail at its first
    kernel)."""
    if torch.cuda.is_available():
        check_gpu_supported()
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def gpu_has_bf16():
    """Whether this GPU computes in bf16 natively: compute capability 8.0 (Ampere) and newer.
    Not torch.cuda.is_bf16_supported(): by default it counts emulation, and says True on a T4 or a
    V100 (7.x), which have no bf16 tensor cores (torch/cuda/__init__.py, including_emulation)."""
    return torch.cuda.get_device_capability()[0] >= 8


def pick_dtype(device, requested="auto"):
    """The training/inference precision: 'fp32', 'bf16' or 'fp16'.

    auto: bf16 on GPUs with bf16 units (Ampere and newer: fp32's range, no loss scaling needed),
    fp16 on older GPUs such as Colab's T4 (needs a GradScaler, see needs_scaler), fp32 on the CPU
    (CPU autocast only pays off on chips with bf16 matrix units). bf16 asked for on a GPU without
    bf16 units is refused: it would run emulated, slower than fp32.
    """
    cuda = device.split(":")[0] == "cuda"
    if cuda and requested == "bf16" and not gpu_has_bf16():
        name, (major, minor) = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
        raise LessonError(f"--dtype bf16: the {name} (compute capability {major}.{minor}) has no "
                          f"bf16 units (8.0 and newer do): use --dtype fp16 (with a GradScaler) "
                          f"or auto")
    if requested != "auto":
        return requested
    if cuda:
        return "bf16" if gpu_has_bf16() else "fp16"
    return "fp32"


def gpu_supported(capability, arch_list):
    """Whether a torch built for arch_list (e.g. ['sm_75', 'sm_80', 'sm_90', 'compute_90']) runs on
    a GPU of this (major, minor) capability: a cubin sm_XY runs on X.Y and later minors of the same
    major; PTX (compute_XY) is compiled by the driver for any X.Y or newer. An empty list (a build
    that does not say) is taken as yes."""
    major, minor = capability
    if not arch_list:
        return True
    for arch in arch_list:
        kind, _, version = arch.partition("_")
        version = version.rstrip("af")  # sm_90a, sm_100f: the same capability, more instructions
        if not version.isdigit():
            continue
        code_major, code_minor = int(version[:-1]), int(version[-1])
        if kind == "sm" and code_major == major and code_minor <= minor:
            return True
        if kind == "compute" and (code_major, code_minor) <= (major, minor):
            return True
    return False


def check_gpu_supported():
    """Refuse, in one line, a GPU the installed torch has no kernels for."""
    capability = torch.cuda.get_device_capability()
    archs = torch.cuda.get_arch_list()
    if not gpu_supported(capability, archs):
        raise LessonError(f"this torch ({torch.__version__}) was built for {' '.join(archs)}, not "
                          f"for the {torch.cuda.get_device_name()} (sm_{capability[0]}"
                          f"{capability[1]}): install a torch build for it, or run on the CPU "
                          f"with CUDA_VISIBLE_DEVICES= python ...")


def needs_scaler(dtype):
    """fp16 gradients underflow to zero without loss scaling; bf16 and fp32 have fp32's range."""
    return dtype == "fp16"


def precision(device, requested="auto"):
    """What lesson 04 trains in on `device` ("cuda:1" too): (dtype, its GradScaler, enabled only
    for fp16)."""
    kind = device.split(":")[0]
    dtype = pick_dtype(kind, requested)
    return dtype, torch.amp.GradScaler(kind, enabled=needs_scaler(dtype))


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
