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

from common.data import make_batch
from common.distill import KD
from common.model import GPT, GPTConfig, logits_fp32
from common.plumbing.artifacts import run_lesson
from common.plumbing.device import (
    DTYPES,
    Precision,
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
        "A100": ("NVIDIA A100-SXM4-40GB", (8, 0)), "H100": ("NVIDIA H100 80GB HBM3", (9, 0)),
        "MI300X": ("AMD Instinct MI300X", (9, 4))}  # ROCm reports gfx942 as 9.4
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
    prec = precision("cuda:0")  # what 04 trains in
    assert prec.dtype == dtype and prec.scaler().is_enabled() == (dtype == "fp16")  # (mock: on)
    assert pick_dtype("cpu") == "fp32"


def test_04s_first_log_line_on_a_t4_says_fp16_with_a_gradscaler(monkeypatch):
    mock_gpu(monkeypatch, "T4")
    from common.plumbing.distributed import Processes
    train = load_lesson("04_train.py")
    monkeypatch.setattr(sys, "argv", ["04_train.py", "--preset", "gpt2"])
    args = train.get_args()
    procs = Processes(ddp=False, rank=0, world=1, device="cuda")
    setup = train.Setup(precision(procs.device, args.dtype), KD())  # as 04's main
    data = {"train": [torch.zeros(9)] * 3, "train_prompt_lens": [1] * 3, "val": [torch.zeros(9)]}
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=50257))
    first = train.describe_run(args, model, data, procs, setup, (1, 1)).splitlines()[0]
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


def test_a_gpu_this_torch_was_not_built_for_is_refused_in_one_line_naming_the_wheel(monkeypatch):
    """torch 2.13's CUDA 12.8 wheels start at sm_75: a V100 is told which wheel still has it (12.6),
    a GPU newer than the build to get a newer torch."""
    mock_gpu(monkeypatch, "V100", archs=["sm_75", "sm_80", "sm_90"])
    with pytest.raises(LessonError) as e:
        get_device()
    msg = str(e.value)
    assert "sm_70" in msg and "Tesla V100" in msg and "CUDA_VISIBLE_DEVICES=" in msg
    assert "download.pytorch.org/whl/cu126" in msg and "\n" not in msg
    mock_gpu(monkeypatch, "H100", archs=["sm_70", "sm_75", "sm_80"])
    with pytest.raises(LessonError, match="a newer torch"):
        get_device()
    mock_gpu(monkeypatch, "T4", archs=["sm_75", "sm_80", "sm_90"])
    check_gpu_supported()  # the T4 is fine


def test_a_rocm_gpu_is_a_gpu_and_trains_in_bf16(monkeypatch):
    """ROCm builds list AMD targets (gfx90a, gfx942), which no capability matches: torch skips its
    arch check there, and so must we. Seen failing: without torch.version.hip the same GPU is
    refused."""
    mock_gpu(monkeypatch, "MI300X", archs=["gfx90a", "gfx942", "gfx1100"])
    with pytest.raises(LessonError):
        get_device()  # (read as a CUDA build: no sm_ matches)
    monkeypatch.setattr(torch.version, "hip", "6.4.43482")
    assert get_device() == "cuda" and pick_dtype("cuda") == "bf16"
    assert not precision("cuda:0").scaler().is_enabled()


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
@pytest.mark.parametrize("kd", ["seq", "soft", "soft-rest", "soft-sampled", "fkl", "rkl", "jsd", "tvd", "skl", "akl",
                                "eopd", "rkl-sampled", "rkl-vopd"])
def test_every_loss_and_its_backward_stay_on_the_models_device_without_a_host_sync(kd):
    """On the meta device (shapes, no data): a tensor the model or a loss makes on the CPU and mixes
    in raises "Tensor on device cpu is not on the expected device meta", as it would on a GPU. And
    the loss the loop trains on (loss_sums) has no shape that depends on the data (logits[y !=
    -100] would: the meta device refuses to guess it), so the CPU never waits for the GPU inside it.
    04's loss_by_hand, shown once, may select by a mask: torch's own switch lets the meta device
    assume every entry selected (its context manager restores the switch, whatever its default)."""
    import torch.fx.experimental._config as fx_config
    train = load_lesson("04_train.py")
    student, teacher = tiny_gpt(0).to("meta").train(), tiny_gpt(1).to("meta")
    seqs = [torch.randint(0, 40, (n,)) for n in (9, 6)]
    topk = ([torch.randint(0, 40, (len(s) - 1, 4), dtype=torch.int32) for s in seqs],
            [torch.randn(len(s) - 1, 4).log_softmax(-1).half() for s in seqs])
    if kd == "soft-sampled":  # 02's sampled cache: ids and their counts
        topk = (topk[0], [torch.randint(1, 5, (len(s) - 1, 4), dtype=torch.uint8) for s in seqs])
    x, y, ids, lps = make_batch(seqs, *topk, device="meta", prompt_lens=[2, 3])
    logits = student(x)[0]
    with torch.no_grad():
        t_logits = logits_fp32(teacher, x)
    name, tail = ("soft", kd[5:]) if kd in ("soft-rest", "soft-sampled") else (kd, "renorm")
    kd = KD(name, T=2.0 if tail == "renorm" else 1.0, tail=tail)
    loss, _ = train.loss_sums(logits, y, kd, (ids, lps), t_logits)  # no data-dependent shape
    assert loss.device.type == "meta"
    loss.backward(retain_graph=True)
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        plain = train.loss_by_hand(logits, y, kd, (ids, lps), t_logits)
    assert plain.device.type == "meta"
    assert student.lm_head.weight.grad.device.type == "meta"


def test_logits_fp32_enters_autocast_only_where_the_course_autocasts(monkeypatch):
    """torch before 2.5 refuses torch.autocast("mps", enabled=False), and the meta device has no
    autocast at all: logits_fp32 (on nearly every lesson's path) switches autocast off only on CUDA
    and the CPU. Apple's MPS runs the course in fp32; half precision there is refused in one line."""
    real = torch.autocast

    def strict(device_type, *args, **kwargs):  # as torch 2.4 answers for "mps"
        if device_type not in ("cuda", "cpu"):
            raise RuntimeError(f"unsupported autocast device_type '{device_type}'")
        return real(device_type, *args, **kwargs)
    monkeypatch.setattr(torch, "autocast", strict)
    model = tiny_gpt().to("meta")
    assert logits_fp32(model, torch.zeros(1, 3, dtype=torch.long, device="meta")).dtype == torch.float32
    assert pick_dtype("mps") == "fp32" and precision("mps").autocast().__enter__() is None
    with pytest.raises(LessonError, match="MPS"):
        pick_dtype("mps", "bf16")


def test_generation_asks_whether_every_row_ended_once_every_16_tokens_off_the_cpu(monkeypatch):
    """bool(done.all()) makes the CPU wait for the GPU: asked at every token it would stall the
    queue at every step. Off the CPU (here: the CPU given the GPU's rule, ASK_EVERY's "cuda" entry
    or, as now, generate's default) generation asks every 16 tokens, and writes the same tokens, the
    rows that ended filled with eos_token. Fails with a default of 1 (a host sync at every token)."""
    import common.sampling as sampling

    class HostReads(TorchFunctionMode):
        reads = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("__bool__", "item", "tolist", "__int__", "__float__"):
                HostReads.reads += 1
            return func(*args, **(kwargs or {}))

    def as_on_a_gpu():  # the GPU's rule: its own entry in ASK_EVERY, else generate's default
        if "cuda" in sampling.ASK_EVERY:
            monkeypatch.setitem(sampling.ASK_EVERY, "cpu", sampling.ASK_EVERY["cuda"])
        else:
            monkeypatch.delitem(sampling.ASK_EVERY, "cpu")
    model = tiny_gpt()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    runs = []
    for gpu in (False, True):
        monkeypatch.setitem(sampling.ASK_EVERY, "cpu", 1)
        if gpu:
            as_on_a_gpu()
        HostReads.reads = 0
        with HostReads():
            out = sampling.generate(model, idx, 64, eos_token=7, generator=torch.Generator().manual_seed(3))
        runs.append((out, HostReads.reads))
    (every, reads_every), (sparse, reads_sparse) = runs
    assert torch.equal(every, sparse) and (every == 7).any()  # the same text, an eos among it
    assert reads_every >= 16 and reads_sparse <= reads_every // 16 + 3, (reads_every, reads_sparse)


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
                                    "07_methods.py", "08_speculative.py", "09_starts.py", "10_bytes.py"])
def test_each_gpu_lessons_out_of_memory_advice_names_its_own_flags(lesson):
    source = open(os.path.join(ROOT, lesson), encoding="utf-8").read()
    call, = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)
             and getattr(n.func, "id", None) == "run_lesson"]
    advice = {k.arg: ast.literal_eval(k.value) for k in call.keywords}["oom"]
    flags = run_here([lesson, "--help"]).stdout
    named = [w.strip("(),") for w in advice.split() if w.startswith("--")]
    assert named and all(f in flags for f in named), (advice, named)


@pytest.mark.parametrize("nccl", [True, False])
def test_under_torchrun_each_process_takes_and_checks_its_gpu_before_joining_the_group(monkeypatch, nccl):
    """NCCL binds a process to the current GPU when the group starts: set_device must come first
    (else every process of a machine starts on GPU 0), and each process checks its own GPU (rank 1
    here sits on a P100 this torch has no kernels for: refused, though GPU 0 is fine); its rank is the
    run's RANK, not its GPU's number on its machine (LOCAL_RANK). Where NCCL
    is missing (torch on Windows), the GPUs talk through gloo."""
    from common.plumbing import distributed
    mock_gpu(monkeypatch, "A100")
    current, calls = [0], []
    gpus = {0: ("NVIDIA A100-SXM4-40GB", (8, 0)), 1: ("Tesla P100-PCIE-16GB", (6, 0))}
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d))
                        or current.__setitem__(0, int(str(d).split(":")[1])))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: gpus[current[0]][1])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: gpus[current[0]][0])
    monkeypatch.setattr(distributed.dist, "is_nccl_available", lambda: nccl)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: int(os.environ["RANK"]))
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    procs = distributed.start()
    assert calls == [("set_device", "cuda:0"), ("init", "nccl" if nccl else "gloo")]
    assert procs.device == "cuda:0" and procs.rank == 0 and procs.world == 2
    monkeypatch.setenv("RANK", "3")  # a second machine's first GPU: its rank is the run's, not the machine's
    procs = distributed.start()
    assert procs.device == "cuda:0" and procs.rank == 3 and not procs.master
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(LessonError, match="Tesla P100.*sm_60"):
        distributed.start()


def test_under_torchrun_on_a_cpu_the_processes_talk_through_gloo_even_where_nccl_is_installed(monkeypatch):
    """NCCL moves GPU tensors only: CPU processes join with gloo (fails with NCCL picked wherever it
    is installed)."""
    from common.plumbing import distributed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed.dist, "is_nccl_available", lambda: True)
    backends = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: backends.append(backend))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    procs = distributed.start()
    assert backends == ["gloo"] and procs.device == "cpu" and (procs.rank, procs.world) == (1, 2)


RANK_PRECISION = """
import os, sys
import torch
from common.plumbing import distributed
from common.plumbing.artifacts import LessonError, run_lesson
rank = int(os.environ["RANK"])  # rank 0 on an RTX 3090 (8.6), rank 1 on an RTX 2080 Ti (7.5)
name, cap = [("NVIDIA GeForce RTX 3090", (8, 6)), ("NVIDIA GeForce RTX 2080 Ti", (7, 5))][rank]
for attr, value in dict(is_available=lambda: True, device_count=lambda: 2, set_device=lambda d: None,
                        get_device_capability=lambda d=None: cap, get_device_name=lambda d=None: name,
                        get_arch_list=lambda: ["sm_75", "sm_80", "sm_86"]).items():
    setattr(torch.cuda, attr, value)
def main():
    procs = distributed.start()  # gloo: this torch has no NCCL
    with open(os.path.join(sys.argv[2], f"rank{rank}.txt"), "w") as f:
        try:
            prec = distributed.agreed_precision(procs, sys.argv[1])
        except LessonError as e:
            f.write(f"refused: {e}")
            raise
        scaler = prec.scaler()
        f.write(f"{prec.dtype}, scaler {scaler.is_enabled()}, scale {scaler.get_scale()}")
    distributed.end(procs)
run_lesson(main)
"""


@pytest.mark.parametrize("requested", ["auto", "bf16"])
def test_ranks_on_gpus_of_two_generations_agree_on_one_precision(tmp_path, requested):
    """torchrun over an RTX 3090 (bf16) and a 2080 Ti (no bf16), 2 real processes whose torch.cuda
    is mocked each its own way: both train fp16 with the same GradScaler (each choosing for itself,
    one would train bf16 unscaled and DDP would average its gradients with ones scaled by 2^16).
    --dtype bf16 is refused by both, in one line each (one refusing alone would leave the other
    waiting for it)."""
    from conftest import run_ranks
    script = tmp_path / "rank_precision.py"
    script.write_text(RANK_PRECISION)
    r = run_ranks([str(script), requested, str(tmp_path)])
    said = [(tmp_path / f"rank{i}.txt").read_text() for i in range(2)]
    if requested == "auto":
        assert r.returncode == 0, r.stdout + r.stderr
        assert said == ["fp16, scaler True, scale 65536.0"] * 2, said
    else:
        assert r.returncode == 1 and "\n" not in said[0] + said[1], said
        assert "another GPU of this run has no bf16 units" in said[0], said
        assert "the NVIDIA GeForce RTX 2080 Ti (compute capability 7.5) has no bf16" in said[1], said


class OnTheGPU(torch.nn.Module):
    """A model that says where it is: on "cuda:0" until moved."""
    def __init__(self):
        super().__init__()
        self.where = "cuda:0"

    def parameters(self, recurse=True):
        yield SimpleNamespace(device=torch.device(self.where))

    def to(self, device, *args, **kwargs):
        self.where = str(device)
        return self

    def cpu(self):
        return self.to("cpu")


def test_the_lab_lends_the_gpu_to_each_run_of_04_it_starts(monkeypatch):
    """07 runs 04 as a child process while it holds the float32 teacher and the memory torch cached
    for it (on a T4: ~4 GB of the 15 a jsd run needs). Each run, the start's included, starts with
    the teacher on the CPU and the cache handed back; between runs the teacher is back on the GPU
    (07 scores each rate with it)."""
    from common.plumbing import runs
    LAB = load_lesson("07_methods.py")
    teacher, emptied, seen = OnTheGPU(), [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(teacher.where))
    record = lambda *a, **k: seen.append((teacher.where, len(emptied))) or {"step": [2]}  # noqa: E731
    monkeypatch.setattr(LAB, "train", record)
    monkeypatch.setattr(runs, "train", record)
    monkeypatch.setattr(LAB, "load_model", lambda *a, **k: (OnTheGPU(), None))
    monkeypatch.setattr(LAB, "val_objective", lambda *a, **k: seen.append(("scored on", teacher.where)) or 1.0)
    args = SimpleNamespace(out="lab", preset="tiny", warm_epochs=1, epochs=1, lr_grid=[1e-3, 1e-2],
                           seeds=2, fresh=False)
    LAB.train_all(args, ["seq"], {}, teacher, precision("cuda", "fp16"))
    runs_seen = [s for s in seen if s[0] != "scored on"]
    assert len(runs_seen) == 1 + 2 + 1  # the start, the grid, the second seed
    assert all(where == "cpu" for where, _ in runs_seen), seen
    assert [n for _, n in runs_seen] == [1, 2, 3, 4]  # the cache emptied before each
    assert [s for s in seen if s[0] == "scored on"] == [("scored on", "cuda:0")] * 2
    assert teacher.where == "cuda:0"


def test_course_speed_finds_a_gpus_peak_by_its_whole_name():
    """MFU divides by the GPU's own peak: "L4" is not an L40S, an H100 PCIe is not the SXM part, a
    GPU not in the table gets no MFU (not another GPU's), and no bf16 peak where there is no bf16."""
    speed = load_lesson("bench/course_speed.py")
    peaks = {"NVIDIA L4": 121, "NVIDIA L40S": 362, "NVIDIA H100 PCIe": 756, "NVIDIA H100 80GB HBM3": 989,
             "NVIDIA A100-SXM4-40GB": 312, "NVIDIA A10G": None, "NVIDIA A10": 125, "NVIDIA H200": 989,
             "NVIDIA GeForce RTX 4090": None}
    assert {name: speed.peak_tflops(name, "bf16") for name in peaks} == peaks
    assert speed.peak_tflops("Tesla T4", "fp16") == 65 and speed.peak_tflops("Tesla T4", "bf16") is None


@pytest.mark.parametrize("flag", [[], ["--deterministic"]])
def test_deterministic_asks_torch_for_deterministic_kernels_before_any_gpu_work(start_copy, monkeypatch, flag):
    """--deterministic: torch's deterministic kernels and a fixed cuBLAS workspace, both set before
    04 touches a GPU (when its processes start); without the flag, neither (the default kernels are
    faster)."""
    from common.plumbing import distributed
    from test_train import keep_train_samples
    keep_train_samples(start_copy, 4, n_val=2)
    seen, real = [], distributed.start
    monkeypatch.setattr(distributed, "start", lambda: seen.append(
        (torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))) or real())
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        r = run_here(["04_train.py", "--preset", "tiny", "--out", str(start_copy), "--epochs", "1", *flag])
    finally:
        torch.use_deterministic_algorithms(False)
    assert r.returncode == 0, r.stderr
    assert seen == ([(True, ":4096:8")] if flag else [(False, None)])


def test_each_precisions_autocast_runs_its_matmuls_in_its_own_dtype():
    """The dtype decided once is the one autocast uses: fp16 on a T4, bf16 on Ampere and later (on
    the device named, "cuda:1" too), and on the CPU a matmul's result in bf16 when asked for."""
    import warnings
    for device, dtype in (("cuda", "fp16"), ("cuda:1", "bf16"), ("cuda", "bf16")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no CUDA here: torch.autocast says it will be disabled
            ctx = Precision(device, dtype).autocast()
        assert (ctx.device, ctx.fast_dtype) == ("cuda", DTYPES[dtype])
    a = torch.randn(4, 4)
    with Precision("cpu", "bf16").autocast():  # (--dtype bf16 on a CPU)
        assert (a @ a).dtype == torch.bfloat16
    with Precision("cpu", "fp32").autocast():
        assert (a @ a).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_models_logits_come_out_in_float32(dtype):
    """A teacher cast to bf16/fp16 (02, 04's online kinds on a GPU): logits_fp32 computes its output
    layer in float32 from the half-precision hidden states and weights, inside autocast too (fails
    with the matmul left in the model's dtype: its logits would carry bf16's 3 digits); a float64
    model's stay float64."""
    model = tiny_gpt().to(dtype)
    x = torch.randint(0, 40, (2, 5))
    h = model.hidden(x)
    want = (h.double() @ model.lm_head.weight.double().T).float()
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            got = logits_fp32(model, x)
        assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert logits_fp32(tiny_gpt().double(), x).dtype == torch.float64


def test_deterministic_also_turns_off_cudnns_autotuner(monkeypatch):
    """--deterministic on a T4: no kernel chosen by timing. cuDNN's autotuner (benchmark) times
    several kernels and keeps the fastest, which may be another one on the next run: switched off,
    even after earlier code (a notebook cell) turned it on; torch's deterministic kernels and a fixed
    cuBLAS workspace with it. Fails with the autotuner left on."""
    from common.plumbing.device import deterministic
    mock_gpu(monkeypatch, "T4")
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        deterministic()
        assert torch.backends.cudnn.benchmark is False
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_a_resume_on_a_gpu_takes_back_the_gpus_random_stream(tmp_path, monkeypatch):
    """Dropout and on-policy sampling draw from the GPU's generator: train_state.pt saved on
    "cuda:1" holds that GPU's state, and a --resume there sets it back on that GPU (the CPU's
    too), so the resumed run draws what the uninterrupted one would have. torch.cuda's generators
    mocked: one state per GPU. Fails with the GPU's state left out of train_state.pt or not set
    back."""
    from test_train_state import loaded, new_state, one_step, parts

    from common.plumbing import train_state
    from common.plumbing.distributed import Processes
    mock_gpu(monkeypatch, "A100")
    states = {"cuda:0": torch.arange(8, dtype=torch.uint8), "cuda:1": torch.arange(8, 16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[str(device)].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda s, device="cuda": states.__setitem__(str(device), s.clone()))
    procs = Processes(ddp=False, rank=0, world=1, device="cuda:1")
    model, optimizer, scaler = parts()
    one_step(model, optimizer)
    path = str(tmp_path / "train_state.pt")
    torch.manual_seed(5)
    saved_gpu, saved_cpu = states["cuda:1"].clone(), torch.get_rng_state()
    train_state.save(new_state(path, step=3), procs, model, optimizer, scaler)
    states["cuda:1"] = torch.full((8,), 99, dtype=torch.uint8)  # a new process: other streams
    torch.manual_seed(6)
    loaded(path, procs, *parts(seed=1))
    assert torch.equal(states["cuda:1"], saved_gpu) and torch.equal(torch.get_rng_state(), saved_cpu)
    assert torch.equal(states["cuda:0"], torch.arange(8, dtype=torch.uint8))  # the other GPU: untouched


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_adamw_updates_every_parameter_in_one_fused_kernel_on_a_gpu(device, monkeypatch):
    """One kernel for all parameters instead of a loop of kernels per tensor: AdamW as 04 and 10
    make it (configure_optimizer, on "cuda" or a torchrun rank's "cuda:1"), and as the tiny
    teacher's training asks for it (its weights' torch.device), is fused on every GPU. Fails with
    the fused kernel kept for the CPU alone."""
    from common.model import fused_adamw
    assert fused_adamw(device) is True
    for version, on_cpu in (("2.3.1", False), ("2.4.0+cpu", True), ("2.13.0", True), ("3.0.0", True)):
        with monkeypatch.context() as m:  # the CPU's fused kernel came with torch 2.4
            m.setattr(torch, "__version__", version)
            assert fused_adamw("cpu") is on_cpu and fused_adamw(device) is True, version
    opt = tiny_gpt().configure_optimizer(1e-3, 0.1, device)
    assert opt.defaults["fused"] is True


@pytest.mark.parametrize("device, waits_on", [("cuda", "cuda"), ("cuda:0", "cuda"), ("cuda:1", "cuda"),
                                              ("mps", "mps"), ("cpu", None)])
def test_a_timer_waits_for_the_gpu_it_times_whichever_rank_it_is(device, waits_on, monkeypatch):
    """sync (before and after every timed run: 02, 04, 06, 08) waits for the queued work of any CUDA
    device, "cuda:1" of a torchrun rank as much as "cuda" (fails with the exact name only: rank 1's
    timings would measure kernel launches), and of Apple's GPU; on the CPU there is nothing to wait for."""
    from common.plumbing.device import sync
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: waited.append("cuda"))
    monkeypatch.setattr(torch.mps, "synchronize", lambda *a: waited.append("mps"))
    sync(device)
    assert waited == ([waits_on] if waits_on else [])
