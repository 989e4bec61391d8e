"""One process, or several training one model together (torchrun): the plumbing lesson 04 calls.

torchrun starts one process per GPU (or several on a CPU) and tells each its place through the
environment: RANK (0 .. WORLD_SIZE-1) and LOCAL_RANK (its GPU on this machine). Each process holds
a full copy of the model and trains on its own share of every step's batches; DDP averages the
gradients across processes in backward, so every copy takes the same optimizer step.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from common.plumbing.device import check_gpu_supported, get_device, gpu_has_bf16, precision


@dataclass
class Processes:
    """Where this process stands: its rank among `world` processes and its device."""
    ddp: bool         # launched by torchrun (RANK is set), even with one process
    rank: int         # 0 .. world-1; rank 0 prints and writes the files
    world: int        # how many processes train together
    device: str       # "cuda:LOCAL_RANK", or get_device() without torchrun
    allreduces: int = 0  # backward passes whose gradients crossed processes (counted by wrap)

    @property
    def master(self):
        return self.rank == 0

    def print(self, *args, **kwargs):
        """print, on rank 0 only: one process speaks for all."""
        if self.master:
            print(*args, **kwargs)


def start():
    """Join the other processes if torchrun started us (NCCL between GPUs, gloo between CPU
    processes, or where NCCL is missing: Windows), else run alone on the best device. In the spirit
    of nanochat's compute_init()."""
    if "RANK" not in os.environ:
        return Processes(ddp=False, rank=0, world=1, device=get_device())
    cuda = torch.cuda.is_available()
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu"
    if cuda:  # before the process group: NCCL then binds each process to its own GPU
        torch.cuda.set_device(device)
        check_gpu_supported()  # this process's own GPU, not GPU 0
    dist.init_process_group(backend="nccl" if cuda and dist.is_nccl_available() else "gloo")
    return Processes(ddp=True, rank=dist.get_rank(), world=dist.get_world_size(), device=device)


def agreed_precision(procs, requested="auto"):
    """One Precision for every process: bf16 only if every GPU of the run has bf16 units (a 3090
    beside a 2080 Ti trains in fp16 with a GradScaler on both). Two precisions in one run would
    average bf16 gradients with fp16 ones scaled by 2^16, and the replicas would drift apart."""
    cuda = procs.device.startswith("cuda")
    bf16 = cuda and gpu_has_bf16()
    if procs.ddp:
        bf16 = bool(all_min(procs, [bf16])[0])
    return precision(procs.device, requested, bf16=bf16 if cuda else None)


def end(procs):
    """The processes wait for each other (rank 0 may still be writing), then disconnect together."""
    if procs.ddp:
        dist.barrier()
        dist.destroy_process_group()


def wrap(model, procs):
    """The model as the training step calls it: wrapped in DDP under torchrun, else as it is.

    DDP's own all-reduce is replaced by the same thing written out (sum the gradients over the
    processes, divide by their number), with a counter: procs.allreduces says how often gradients
    crossed, which is once a step if the accumulation's no_sync works."""
    if not procs.ddp:
        return model
    ids = [int(procs.device.split(":")[1])] if procs.device.startswith("cuda") else None
    wrapped = DDP(model, device_ids=ids)

    def mean_allreduce(_, bucket):
        procs.allreduces += bucket.index() == 0  # once per backward, at its first bucket
        grads = bucket.buffer().div_(procs.world)
        return dist.all_reduce(grads, async_op=True).get_future().then(lambda fut: fut.value()[0])
    wrapped.register_comm_hook(None, mean_allreduce)
    return wrapped


def all_sum(procs, values):
    """Each value summed over the processes (in float64), as a list of floats."""
    return _all_reduce(procs, values, dist.ReduceOp.SUM)


def all_min(procs, values):
    """Each value's minimum over the processes, as a list of floats."""
    return _all_reduce(procs, values, dist.ReduceOp.MIN)


def _all_reduce(procs, values, op):
    # gloo reduces CPU tensors (and CUDA ones); a CPU tensor works with either backend but NCCL
    device = procs.device if procs.ddp and dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if procs.ddp:
        dist.all_reduce(t, op=op)
    return t.tolist()


def rng_state(device):
    """This process's random-number state: the CPU's and, on a GPU, the GPU's (dropout is drawn
    there)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None}


def set_rng_state(state, device):
    """Restore a state from rng_state (the GPU's only on a GPU)."""
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(procs):
    """Every process's random-number state, in rank order (each process must call this)."""
    mine = rng_state(procs.device)
    if not procs.ddp:
        return [mine]
    states = [None] * procs.world
    dist.all_gather_object(states, mine)
    return states
