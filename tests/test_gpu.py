"""The GPU paths, proven on a CPU: torch.cuda mocked to be a T4, V100, A100 or H100 (the precision,
the GradScaler, 04's first log line, a GPU torch has no kernels for); random draws whose generator
lives on another device than their tensors (CUDA refuses those); the model, its backward and every
loss on the meta device (a CPU tensor made along the way fails there as it would on a GPU); a GPU
out of memory said in one line by every lesson.

Why not FakeTensorMode with "cuda" tensors: on the CPU-only torch wheel it can make them, but most
ops on them (matmul, layer_norm, add) abort the whole process ("PyTorch is not linked with support
for cuda devices", from a C++ device guard), so the meta device stands in for the GPU here."""
import ast
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from common.distill import KD, make_batch
from common.model import GPT, GPTConfig
from common.plumbing.artifacts import run_lesson
from common.plumbing.device import (
    check_gpu_supported,
    get_device,
    gpu_supported,
    pick_dtype,
    precision,
)
from common.plumbing.errors import LessonError
from conftest import ROOT, load_lesson, run_here

# name, compute capability; torch 2.13's CUDA 12.8 wheels are built for these (get_arch_list())
GPUS = {"T4": ("Tesla T4", (7, 5)), "V100": ("Tesla V100-SXM2-16GB", (7, 0)),
        "A100": ("NVIDIA A100-SXM4-40GB", (8, 0)), "H100": ("NVIDIA H100 80GB HBM3", (9, 0))}
ARCHS = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


def mock_gpu(monkeypatch, gpu, archs=ARCHS):
    """torch.cuda answering as it does on this GPU, is_bf16_supported included: its default counts
    emulation and says True on every one of them (torch/cuda/__init__.py creates a bf16 tensor)."""
    name, (major, minor) = GPUS[gpu]
    props = SimpleNamespace(name=name, major=major, minor=minor, total_memory=16 << 30)
    for attr, value in {"is_available": lambda: True, "device_count": lambda: 1,
                        "current_device": lambda: 0, "get_device_name": lambda d=None: name,
                        "get_device_capability": lambda d=None: (major, minor),
                        "get_device_properties": lambda d=None: props,
                        "is_bf16_supported": lambda including_emulation=True: (
                            major >= 8 or including_emulation),
                        "get_arch_list": lambda: list(archs)}.items():
        monkeypatch.setattr(torch.cuda, attr, value)


@pytest.mark.parametrize("gpu, dtype", [("T4", "fp16"), ("V100", "fp16"), ("A100", "bf16"),
                                        ("H100", "bf16")])
def test_auto_precision_follows_the_gpu_fp16_with_a_scaler_before_ampere(monkeypatch, gpu, dtype):
    mock_gpu(monkeypatch, gpu)
    assert get_device() == "cuda"
    assert pick_dtype("cuda") == pick_dtype("cuda:0") == dtype
    got, scaler = precision("cuda:0")  # what 04 trains in
    assert got == dtype and scaler.is_enabled() == (dtype == "fp16")  # (the mock keeps it on)
    assert pick_dtype("cpu") == "fp32"


def test_04s_first_log_line_on_a_t4_says_fp16_with_a_gradscaler(monkeypatch):
    mock_gpu(monkeypatch, "T4")
    from common.plumbing.distributed import Processes
    from common.plumbing.progress import describe_run
    train = load_lesson("04_train.py")
    monkeypatch.setattr(sys, "argv", ["04_train.py", "--preset", "gpt2"])
    args = train.get_args()
    procs = Processes(ddp=False, rank=0, world=1, device="cuda")
    dtype, scaler = precision(procs.device, args.dtype)  # as 04's main
    data = {"train": [torch.zeros(9)] * 3, "train_prompt_lens": [1] * 3, "val": [torch.zeros(9)]}
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=50257))
    first = describe_run(args, model, data, procs, dtype, scaler, None, 1, 1).splitlines()[0]
    assert "| cuda fp16 + GradScaler |" in first, first


@pytest.mark.parametrize("gpu", ["T4", "V100"])
def test_bf16_asked_for_on_a_gpu_without_bf16_units_is_refused_in_one_line(monkeypatch, gpu):
    mock_gpu(monkeypatch, gpu)
    with pytest.raises(LessonError) as e:
        pick_dtype("cuda", "bf16")
    assert "no bf16 units" in str(e.value) and "--dtype fp16" in str(e.value)
    assert "\n" not in str(e.value)
    assert pick_dtype("cuda", "fp16") == "fp16" and pick_dtype("cuda", "fp32") == "fp32"
    mock_gpu(monkeypatch, "A100")
    assert pick_dtype("cuda", "bf16") == "bf16"


def test_which_gpus_a_torch_build_runs_on():
    assert gpu_supported((7, 5), ARCHS) and gpu_supported((8, 9), ARCHS)  # sm_80 runs on 8.6/8.9
    assert gpu_supported((12, 1), ARCHS)                                  # sm_120 on 12.1
    assert not gpu_supported((6, 0), ARCHS)                               # a P100: too old
    assert not gpu_supported((7, 0), ["sm_75", "sm_80"])                 # 7.5 code on a 7.0 GPU
    assert gpu_supported((13, 0), ["sm_90", "compute_90"])                # PTX: the driver compiles
    assert not gpu_supported((8, 0), ["sm_90a"])                          # Hopper-only code
    assert gpu_supported((9, 0), ["sm_90a"]) and gpu_supported((6, 1), [])


def test_a_gpu_this_torch_was_not_built_for_is_refused_in_one_line(monkeypatch):
    mock_gpu(monkeypatch, "V100", archs=["sm_75", "sm_80", "sm_90"])
    with pytest.raises(LessonError) as e:
        get_device()
    msg = str(e.value)
    assert "sm_70" in msg and "Tesla V100" in msg and "CUDA_VISIBLE_DEVICES=" in msg
    mock_gpu(monkeypatch, "T4", archs=["sm_75", "sm_80", "sm_90"])
    check_gpu_supported()  # the T4 is fine


# --- random draws: the generator must live where the numbers are drawn ---
class CudaGenerator(torch.Generator):
    """A CPU generator that says it is on the GPU: the mode below then holds it to CUDA's rule."""
    @property
    def device(self):
        return torch.device("cuda")


class GeneratorDeviceCheck(TorchFunctionMode):
    """CUDA's rule for random draws, on a CPU: a call given generator=g must run on g's device (the
    device= argument, else its first tensor's, else the CPU), or it raises as CUDA does. "cuda" in
    any argument means the CPU here, so code that follows the rule runs."""
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.device:  # (modes see torch.device("cuda") too: leave it a GPU)
            return func(*args, **kwargs)
        g = kwargs.get("generator")
        if g is not None:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            where = kwargs.get("device") or (on_gpu(tensors[0]) if tensors else "cpu")
            if torch.device(where).type != g.device.type:
                raise RuntimeError(f"Expected a '{torch.device(where).type}' device type for "
                                   f"generator but found '{g.device.type}'")
        gpu = lambda a: isinstance(a, (str, torch.device)) and str(a).startswith("cuda")
        out = func(*["cpu" if gpu(a) else a for a in args],
                   **{k: "cpu" if gpu(v) else v for k, v in kwargs.items()})
        if func is torch.Tensor.to and any(map(gpu, [*args, *kwargs.values()])):
            out = out.clone()  # a tensor "moved to the GPU": marked as such
            out.on_gpu = True
        return out


def on_gpu(t):
    """The device a tensor stands for under GeneratorDeviceCheck: "cuda" if it was moved there."""
    return "cuda" if getattr(t, "on_gpu", False) else t.device


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=40)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("sampling", [dict(), dict(top_k=5), dict(top_k=5, top_p=0.8), dict(top_p=0.9)])
def test_sampling_draws_on_the_generators_own_device(sampling):
    from common.sampling import generate, sample_next
    model, idx = tiny_gpt(), torch.zeros(2, 3, dtype=torch.long)
    want = generate(model, idx, 6, generator=torch.Generator().manual_seed(1), **sampling)
    with GeneratorDeviceCheck():  # a GPU generator for CPU tensors: each draw on its own device
        got = generate(model, idx, 6, generator=CudaGenerator().manual_seed(1), **sampling)
        sample_next(torch.randn(3, 40), generator=CudaGenerator(), **sampling)
    assert torch.equal(got, want)  # the same numbers: drawn by the same generator, then moved
    with GeneratorDeviceCheck(), pytest.raises(RuntimeError, match="device type for generator"):
        torch.rand(2, generator=CudaGenerator(), device="cpu")  # the check itself bites


def test_speculative_decoding_draws_on_the_generators_own_device():
    """08 passes a CPU generator while the models run on the GPU: every draw (the draft's
    proposals, the accept test, the residual, the bonus) must happen on the generator's device."""
    from common.speculative import speculative_generate
    target, draft = tiny_gpt(0), tiny_gpt(1)
    prompt = torch.tensor([0, 3, 5])
    want = speculative_generate(target, draft, prompt, 12, 3, top_k=10,
                                generator=torch.Generator().manual_seed(2))[0]
    with GeneratorDeviceCheck():
        got = speculative_generate(target, draft, prompt, 12, 3, top_k=10,
                                   generator=CudaGenerator().manual_seed(2))[0]
    assert got == want


# --- the model, its backward and every loss, with nothing made on the CPU on the way ---
@pytest.mark.parametrize("kd", ["seq", "soft", "soft-rest", "fkl", "rkl", "jsd", "tvd", "rkl-sampled"])
def test_every_loss_and_its_backward_stay_on_the_models_device(kd, monkeypatch):
    """On the meta device (shapes, no data): a tensor the model or a loss makes on the CPU and mixes
    in raises "Tensor on device cpu is not on the expected device meta", as it would on a GPU."""
    import torch.fx.experimental._config as fx_config  # logits[y != -100]: a shape from data;
    monkeypatch.setattr(fx_config, "meta_nonzero_assume_all_nonzero", True)  # meta takes it all
    train = load_lesson("04_train.py")
    student, teacher = tiny_gpt(0).to("meta").train(), tiny_gpt(1).to("meta")
    seqs = [torch.randint(0, 40, (n,)) for n in (9, 6)]
    topk = ([torch.randint(0, 40, (len(s) - 1, 4), dtype=torch.int32) for s in seqs],
            [torch.randn(len(s) - 1, 4).log_softmax(-1).half() for s in seqs])
    x, y, ids, lps = make_batch(seqs, *topk, device="meta", prompt_lens=[2, 3])
    logits = student(x)[0]
    with torch.no_grad():  # (logits_fp32's autocast(enabled=False) does not take "meta")
        t_logits = teacher(x)[0].float()
    name, tail = ("soft", "rest") if kd == "soft-rest" else (kd, "renorm")
    kd = KD(name, T=1.0 if tail == "rest" else 2.0, tail=tail)
    for loss_fn in (train.loss_sums, train.loss_by_hand):
        loss = loss_fn(logits, y, kd, (ids, lps), t_logits)
        loss = loss[0] if isinstance(loss, tuple) else loss
        assert loss.device.type == "meta"
        loss.backward(retain_graph=True)
    assert student.lm_head.weight.grad.device.type == "meta"


# --- a GPU out of memory: one line, in every lesson ---
def test_a_gpu_out_of_memory_is_one_line_that_says_what_to_lower(capsys):
    def main():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(SystemExit) as e:
        run_lesson(main, oom="a smaller --batch-size")
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ran out of memory" in err and "--batch-size" in err


@pytest.mark.parametrize("lesson", ["02_generate.py", "04_train.py", "05_evaluate.py", "06_compare.py",
                                    "07_methods.py", "08_speculative.py", "09_starts.py"])
def test_each_gpu_lessons_out_of_memory_advice_names_its_own_flags(lesson):
    source = open(os.path.join(ROOT, lesson), encoding="utf-8").read()
    call, = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)
             and getattr(n.func, "id", None) == "run_lesson"]
    advice = {k.arg: ast.literal_eval(k.value) for k in call.keywords}["oom"]
    flags = run_here([lesson, "--help"]).stdout
    named = [w.strip("(),") for w in advice.split() if w.startswith("--")]
    assert named and all(f in flags for f in named), (advice, named)


def test_under_torchrun_each_process_takes_its_gpu_before_joining_the_group(monkeypatch):
    """NCCL binds a process to the current GPU when the group starts: set_device must come first
    (else every process of a machine starts on GPU 0)."""
    from common.plumbing import distributed
    mock_gpu(monkeypatch, "A100")
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    procs = distributed.start()
    assert calls == [("set_device", "cuda:1"), ("init", "nccl")]
    assert procs.device == "cuda:1" and procs.rank == 1 and procs.world == 2
