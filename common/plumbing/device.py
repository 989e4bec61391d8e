"""Where the work runs, and in which precision: decided here, in one place."""
import contextlib
import ctypes
import os
import platform
import sys
from dataclasses import dataclass

import torch

from common.plumbing.errors import LessonError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def get_device():
    """The fastest device available: a CUDA (or ROCm) GPU, then Apple's MPS, then the CPU. A GPU
    this torch has no kernels for is refused in one line (it would pass is_available() and fail at
    its first kernel)."""
    if torch.cuda.is_available():
        check_gpu_supported()
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def gpu_has_bf16():
    """Whether this GPU computes in bf16 natively: compute capability 8.0 (Ampere) and newer, and
    every AMD GPU torch's ROCm builds run on (torch.cuda.is_bf16_supported says so for ROCm).
    Not is_bf16_supported() on NVIDIA: by default it counts emulation, and says True on a T4 or a
    V100 (7.x), which have no bf16 tensor cores (torch/cuda/__init__.py, including_emulation)."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability()[0] >= 8


def pick_dtype(device, requested="auto", bf16=None):
    """The precision on `device`: 'fp32', 'bf16' or 'fp16'. auto: bf16 on GPUs with bf16 units,
    fp16 (with a GradScaler) on older GPUs such as Colab's T4, fp32 on a CPU and on Apple's MPS.
    bf16: whether every GPU of the run has bf16 units (default: this one's)."""
    # bf16 has fp32's range: no loss scaling. A CPU's autocast pays off only with bf16 matrix
    # units; MPS autocast needs torch 2.5. bf16 asked for without bf16 units is refused: it would
    # run emulated, slower than fp32.
    kind = device.split(":")[0]
    if kind == "mps" and requested not in ("auto", "fp32"):
        raise LessonError(f"--dtype {requested}: on Apple's MPS the course runs in fp32 (autocast "
                          f"there needs torch 2.5, fp16 a GradScaler): use --dtype fp32 or auto")
    if kind != "cuda" or requested in ("fp32", "fp16"):
        return "fp32" if requested == "auto" else requested
    if bf16 is None:
        bf16 = gpu_has_bf16()
    if requested == "bf16" and not bf16:
        name, (major, minor) = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
        which = (f"the {name} (compute capability {major}.{minor})" if not gpu_has_bf16() else
                 "another GPU of this run")
        raise LessonError(f"--dtype bf16: {which} has no bf16 units (8.0 and newer do): use "
                          f"--dtype fp16 (with a GradScaler) or auto")
    if requested != "auto":
        return requested
    return "bf16" if bf16 else "fp16"


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
    """Refuse, in one line, a GPU (the current one) the installed torch has no kernels for. ROCm
    builds list AMD's targets (gfx90a, gfx942...), not capabilities: torch skips the check there,
    and so do we."""
    if torch.version.hip:
        return
    capability = torch.cuda.get_device_capability()
    archs = torch.cuda.get_arch_list()
    if not gpu_supported(capability, archs):
        # torch 2.13's CUDA 12.8+ wheels start at sm_75; its CUDA 12.6 wheels still have sm_50-sm_70
        wheel = ("pip install torch --index-url https://download.pytorch.org/whl/cu126 (the CUDA "
                 "12.6 build still has Volta and older)" if capability[0] <= 7 else
                 "a newer torch from pytorch.org")
        raise LessonError(f"this torch ({torch.__version__}) was built for {' '.join(archs)}, not "
                          f"for the {torch.cuda.get_device_name()} (sm_{capability[0]}"
                          f"{capability[1]}): install {wheel}, or run on the CPU with "
                          f"CUDA_VISIBLE_DEVICES= python ...")


def needs_scaler(dtype):
    """fp16 gradients underflow to zero without loss scaling; bf16 and fp32 have fp32's range."""
    return dtype == "fp16"


@dataclass(frozen=True)
class Precision:
    """A run's precision, decided once: its device and the dtype its matmuls run in. Every forward
    pass runs under `with prec.autocast():`; fp16 training needs `prec.scaler()`."""
    device: str  # "cuda", "cuda:1", "mps", "cpu"
    dtype: str   # "fp32", "bf16" or "fp16"

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    def autocast(self):
        """Mixed precision: matmuls in dtype, reductions in fp32; a no-op for fp32. A new context
        each time (one torch.autocast object must not be entered twice at once)."""
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=self.torch_dtype)

    def scaler(self):
        """A GradScaler, enabled only for fp16 (scale 2^16, halved on an overflow)."""
        return torch.amp.GradScaler(self.device.split(":")[0], enabled=needs_scaler(self.dtype))


def precision(device, requested="auto", bf16=None):
    """The Precision of a run on `device` ("cuda:1" too); bf16 as in pick_dtype."""
    return Precision(device, pick_dtype(device, requested, bf16))


def deterministic():
    """Make a GPU's training repeat itself exactly (run to run, and so across a --resume): the
    deterministic kernels (attention's backward, scatter-adds) and a fixed cuBLAS workspace.
    Slower; a CPU run is deterministic without it."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS's first call
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def sync(device):
    """Wait for queued GPU work, so that a timer measures the work and not just its launch."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def keep_freed_memory():
    """On Linux, make malloc keep freed memory for reuse instead of handing it back to the system
    (a third of a CPU training step, bench/bench_cpu.py). Returns whether it took (not on macOS,
    Windows, musl)."""
    # glibc serves a request over 32 MB with fresh pages from the kernel and returns them on free;
    # the first write to each fresh 4 KB page is a page fault. A CPU training step makes several
    # such tensors (the 6/512 student's logits at batch 4 x 256: 206 MB). M_MMAP_MAX = 0: no fresh
    # mappings; M_TRIM_THRESHOLD: keep up to 2 GB freed. The cost: the process keeps its peak.
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
