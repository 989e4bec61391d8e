"""Saving and loading the .pt files that carry the course from one lesson to the next.

Every artifact is a plain dict with a "kind" field, saved atomically and loaded with
torch.load(weights_only=True): a checkpoint is a pickle, and weights_only refuses to run code
hidden in one. Any problem with a file becomes a LessonError, a one-line message that names the
file and the lesson that makes it.
"""
import contextlib
import os
import signal
import sys
import threading
from types import SimpleNamespace

import torch

from common.gpt2_weights import CheckpointError
from common.model import GPT, GPTConfig
from common.plumbing.cli import preset_advice
from common.plumbing.errors import LessonError
from common.tokenizer import TokenizerError

# kind -> (what it is, in words; the lesson that writes it)
KINDS = {
    "teacher": ("teacher checkpoint", "01_teacher.py"),
    "generated": ("generated-data file", "02_generate.py"),
    "student_init": ("initial student checkpoint", "03_student.py"),
    "student": ("trained student checkpoint", "04_train.py"),
    "train_state": ("resumable training state", "04_train.py"),
    "train_log": ("training log", "04_train.py"),
    "eval": ("evaluation results file", "05_evaluate.py"),
    "methods": ("divergence-lab results file", "07_methods.py"),
    "speculative": ("speculative-decoding results file", "08_speculative.py"),
    "starts": ("three-starts results file", "09_starts.py"),
    "bytes": ("byte-students results file", "10_bytes.py"),
}
MODEL_KINDS = ("teacher", "student_init", "student")


def run_lesson(main, oom="a smaller --batch-size"):
    """Run a lesson's main(); LessonError, a file that is not GPT-2, no tokenizer, a GPU out of
    memory and Ctrl-C become a one-line message and an exit code. oom: what to lower in this
    lesson when the GPU runs out of memory."""
    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun, one process speaks for all
    code = 0
    try:
        main()
    except (LessonError, CheckpointError, TokenizerError, torch.cuda.OutOfMemoryError) as e:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            e = (f"the GPU ran out of memory: try {oom}, and close other programs on the GPU (in "
                 f"a notebook, restart the runtime); files already written are kept")
        if not quiet:
            print(f"error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("interrupted (files already written are intact)", file=sys.stderr)
        code = 130
    # raised here, not inside the except: in a notebook the cell then ends with "SystemExit: 1"
    # alone (a "run all" stops there), not with the whole chain of tracebacks
    if code:
        sys.exit(code)


@contextlib.contextmanager
def interrupt_deferred():
    """Hold Ctrl-C (SIGINT) until the block is done, then raise KeyboardInterrupt.

    For work that must not stop halfway, such as writing and renaming a file. Only the main thread
    can install signal handlers; elsewhere the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_finishes_the_step(announce):
    """Inside the block, a first Ctrl-C only sets `.requested` on the yielded object (a training
    loop reads it at the end of its step, then saves and stops) and calls announce(); a second one
    raises KeyboardInterrupt at once. Only the main thread can install signal handlers; elsewhere
    Ctrl-C keeps its usual meaning."""
    stop = SimpleNamespace(requested=False)

    def on_ctrl_c(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        announce()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_ctrl_c) if main_thread else None
    try:
        yield stop
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def save_artifact(obj, path):
    """torch.save to a temporary file in the same folder, then rename it over `path`.

    A rename within one file system is atomic: a crash or kill mid-write leaves the previous file as
    it was, never a half-written one. Ctrl-C is held until the save is done (then raised as usual).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with interrupt_deferred():
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def write_text(text, path):
    """Write a text file atomically, like save_artifact."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with interrupt_deferred():
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)


def load_artifact(path, kind, keys=()):
    """Load the artifact at `path`, check it is of `kind` (a name or a tuple of names) and has
    `keys`."""
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    maker = KINDS[kinds[0]][1]
    if not os.path.exists(path):
        raise LessonError(f"{path} not found: run {maker} first")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Unsupported global" in str(e):  # a pickled class or function: loading it could run code
            raise LessonError(f"{path} holds Python objects that a safe load refuses (it may run "
                              f"code): run {maker} again to make a clean one") from None
        raise LessonError(f"{path} is truncated or not a checkpoint: run {maker} again") from None
    if not isinstance(obj, dict) or obj.get("kind") not in KINDS:
        raise LessonError(f"{path} is not a file of this course: run {maker} again")
    if obj["kind"] not in kinds:
        a = lambda what: ("an " if what[0] in "aeiou" else "a ") + what
        wanted = " or ".join(a(KINDS[k][0]) for k in kinds)
        raise LessonError(f"{path} is {a(KINDS[obj['kind']][0])}, not {wanted}: run {maker} to "
                          f"make one")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise LessonError(f"{path} lacks {', '.join(missing)}: run {KINDS[obj['kind']][1]} again")
    return obj


def state_snapshot(model):
    """A CPU copy of the model's state_dict that keeps tied weights tied: lm_head.weight IS the
    token embedding, so its copy is the same tensor, and torch.save writes that storage once, not
    twice."""
    copies, out = {}, {}  # (memory address, shape, strides) of an original tensor -> its copy
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape, v.stride(), v.device)
        if key not in copies:
            copies[key] = v.detach().to("cpu", copy=True)
        out[k] = copies[key]
    return out


def check_preset(obj, path, preset):
    """Refuse an input made with another preset: a gpt2-preset lesson on a tiny teacher would build
    a student ten times larger than its teacher, and the reverse a toy student for GPT-2. Files from
    before presets were recorded carry none and pass."""
    made = obj.get("preset")
    if made is not None and made != preset:
        raise LessonError(f"{path} was made with the {made} preset, this lesson runs the {preset} "
                          f"preset: {preset_advice(made)} to go on with this folder, or start a "
                          f"new folder from 01_teacher.py")


def model_checkpoint(model, kind, **extra):
    """The dict a model is saved as: its config, a snapshot of its weights, and what produced it."""
    cfg = model.config
    return dict(kind=kind, config={f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
                model=state_snapshot(model), **extra)


def load_model(path, kind, vocab_size=None):
    """A model checkpoint loaded into a GPT (CPU, eval mode); errors say which lesson to rerun."""
    ckpt = load_artifact(path, kind, keys=("config", "model"))
    maker = KINDS[ckpt["kind"]][1]
    try:
        config = GPTConfig.from_dict(ckpt["config"])
        model = GPT(config)
    except (TypeError, ValueError, AssertionError) as e:
        raise LessonError(f"{path} has an invalid config ({e}): run {maker} again") from None
    if vocab_size is not None and config.vocab_size != vocab_size:
        raise LessonError(f"{path} was built for a vocabulary of {config.vocab_size} tokens, but "
                          f"the GPT-2 tokenizer has {vocab_size}: run {maker} again")
    state = ckpt["model"]
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    if missing or unexpected:
        detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise LessonError(f"{path} does not match its own config ({detail}): run {maker} again")
    for k, v in state.items():
        if v.shape != ours[k].shape:
            raise LessonError(f"{path}: {k} has shape {tuple(v.shape)}, its config says "
                              f"{tuple(ours[k].shape)}: run {maker} again")
    model.load_state_dict(state)
    model.eval()
    return model, ckpt
