"""The training run's saved state: everything needed to stop at any step and go on exactly.

train_state.pt holds the weights, the optimizer's and the GradScaler's state, the step, the best
checkpoint so far, the history, every process's random-number state and the flags of the run. A
resumed run refuses other flags (it would not be the run that was started), naming them; a fresh
run keeps an unfinished state as train_state.prev.pt rather than overwrite it. Lesson 04 calls
these; in the spirit of nanochat's checkpoint_manager.py.
"""
import contextlib
import math
import os
import time
from dataclasses import dataclass, field

import torch

from common.plumbing.artifacts import (
    LessonError,
    load_artifact,
    model_checkpoint,
    save_artifact,
    state_snapshot,
)
from common.plumbing.distributed import gather_rng_states, set_rng_state
from common.plumbing.progress import fmt_time

# Flags that cannot change the trained weights: they may differ between a run and its --resume.
# Every other flag must be the same, or the resumed run would not be the run that was started.
RESUME_MAY_CHANGE = ("out", "preset", "resume", "log_interval", "stop_after")


def new_history():
    """Per step: its number, loss, cross-entropy, lr, gradient norm; per validation (step, loss);
    in all: the scored tokens, the positions the student trained on and those it ran through while
    writing on-policy text (04's tokens_of_step; what a run's compute is counted from)."""
    return {"step": [], "loss": [], "ce": [], "lr": [], "grad_norm": [], "val": [], "tokens": 0,
            "student_tokens": 0, "sampled_tokens": 0}


@dataclass
class TrainState:
    """What changes as the run goes, saved with the weights and the optimizer; and what is fixed
    for the run and saved beside it."""
    path: str                       # train_state.pt
    settings: dict                  # the flags that decide the weights (settings_of)
    config: dict                    # the student's config (a resume must be of the same student)
    total_steps: int
    step: int = 0                   # optimizer steps done
    best_val: float = math.inf      # the lowest validation loss so far
    best: dict = None               # the checkpoint that had it (written as student.pt at the end)
    history: dict = field(default_factory=new_history)
    wall_before: float = 0.0        # seconds spent in earlier parts of a resumed run
    started: float = field(default_factory=time.time)  # when this part began

    def wall_time(self):
        """Seconds of training, all parts of a resumed run together."""
        return self.wall_before + time.time() - self.started

    def record(self, counts, **values):
        """One finished step: its token counts added up, its values (loss, ce, lr, grad_norm)
        appended to the history."""
        self.history["step"].append(self.step)
        for k, n in counts.items():
            self.history[k] = self.history.get(k, 0) + n
        for k, v in values.items():
            self.history[k].append(v)

    def keep_if_best(self, v, model, preset):
        """Record the val loss v; if it is the lowest so far, keep a copy of the weights as the best
        (and return True)."""
        self.history["val"].append((self.step, v))
        if not v < self.best_val:
            return False
        self.best_val = v
        self.best = model_checkpoint(model, "student", val_loss=v, step=self.step, preset=preset)
        return True


def settings_of(flags, dtype):
    """The flags (a dict) that decide the trained weights, with the dtype as resolved ("auto"
    becomes fp32 on a CPU, bf16 or fp16 on a GPU)."""
    settings = {k: v for k, v in flags.items() if k not in RESUME_MAY_CHANGE}
    settings["dtype"] = dtype
    return settings


def changed_settings(saved, settings, saved_world, world):
    """The names of the settings that differ from the saved ones ("process count" for the world)."""
    changed = [k for k in settings if saved.get(k) != settings[k]]
    return changed + (["process count"] if saved_world != world else [])


def save(state, procs, model, optimizer, scaler):
    """Write train_state.pt (every process calls this: each gives its random-number state; rank 0
    writes)."""
    t0, rng = time.time(), gather_rng_states(procs)
    best = state.best
    if best is not None and best["step"] == state.step:  # the best IS the current weights: once
        best = {**best, "model": None}  # (the student's weights are a quarter of the file)
    if procs.master:
        save_artifact({"kind": "train_state", "model": model.state_dict(),
                       "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                       "step": state.step, "best_val": state.best_val, "best": best,
                       "history": state.history, "rng": rng, "world": procs.world,
                       "wall_time": state.wall_time(), "total_steps": state.total_steps,
                       "config": state.config, "settings": state.settings}, state.path)
    h = state.history  # what saving costs (bench/course_speed.py prints it)
    h["save_seconds"] = h.get("save_seconds", 0.0) + time.time() - t0


def save_results(state, procs, model, out, log):
    """A finished run's files, written by rank 0: student.pt (the lowest val loss),
    student_last.pt, train_log.pt (the history and `log`, the lesson's own entries, its preset
    among them); then the line that says so."""
    if state.best is None:
        raise LessonError("the validation loss was never finite, so there is no student to save: "
                          "try a lower --lr")
    if not procs.master:
        return
    h = state.history
    save_artifact(state.best, f"{out}/student.pt")
    last = model_checkpoint(model, "student", val_loss=h["val"][-1][1], step=state.step,
                            preset=log["preset"])
    save_artifact(last, f"{out}/student_last.pt")
    save_artifact({"kind": "train_log", "preset": log["preset"], **h, **log,
                   "world": procs.world, "wall_time": state.wall_time(),
                   "best_val": state.best_val}, f"{out}/train_log.pt")
    print(f"trained in {fmt_time(state.wall_time())} | {h['tokens']:,} tokens seen | best val "
          f"loss {state.best_val:.4f} (ppl {math.exp(state.best_val):.1f}) | wrote "
          f"{out}/student.pt, student_last.pt, train_log.pt")


def load(state, procs, model, optimizer, scaler):
    """Load train_state.pt into the model, optimizer and scaler, after checking it belongs to this
    student and these flags; each process takes back its own random stream. Fills `state` in."""
    path = state.path
    st = load_artifact(path, "train_state",
                       keys=("model", "optimizer", "step", "config", "settings"))
    if st["config"] != state.config:
        start = state.settings.get("init") or "student_init.pt"
        raise LessonError(f"{path} is for a different student than {start}: run without --resume")
    changed = changed_settings(st["settings"], state.settings, st.get("world", 1), procs.world)
    if changed:
        was = ", ".join(f"--{k.replace('_', '-')} {st['settings'].get(k)}"
                        for k in changed if k in state.settings)
        raise LessonError(f"{path} was made with other settings ({', '.join(changed)}"
                          f"{': it had ' + was if was else ''}): resume with the same flags, "
                          f"or run without --resume")
    model.load_state_dict(st["model"])
    optimizer.load_state_dict(st["optimizer"])
    scaler.load_state_dict(st["scaler"])
    set_rng_state(st["rng"][procs.rank], procs.device)
    best = st.get("best")
    if best is not None and best["model"] is None:  # saved as the weights of the saved step
        best = {**best, "model": state_snapshot(model)}
    state.step, state.best_val, state.best = st["step"], st["best_val"], best
    state.history, state.wall_before = st["history"], st.get("wall_time", 0.0)


def start(state, resume, procs, model, optimizer, scaler):
    """Load train_state.pt into a fresh state with --resume (see load); else keep an unfinished
    run's state as train_state.prev.pt. Says which on rank 0."""
    if resume:
        load(state, procs, model, optimizer, scaler)
        procs.print(f"resumed from {state.path} at step {state.step}/{state.total_steps}")
    elif procs.master and keep_unfinished(state.path):
        procs.print(f"an unfinished run's {state.path} is kept as train_state.prev.pt (rename it "
                    f"back to resume it)")


def keep_unfinished(path):
    """If `path` holds an unfinished run's state, rename it to train_state.prev.pt (a fresh run
    would otherwise overwrite it at its first epoch end). Returns whether it did."""
    if not os.path.exists(path):
        return False
    try:  # mmap: read the step count without loading the weights
        old = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        unfinished = old["step"] < old.get("total_steps", float("inf"))
    except Exception:
        unfinished = True
    if unfinished:
        os.replace(path, os.path.join(os.path.dirname(path), "train_state.prev.pt"))
    return unfinished


@contextlib.contextmanager
def failures_explained(state, batch_size, grad_accum):
    """What can go wrong in the loop, said in one line with what to do (no traceback): a second
    Ctrl-C, a loss that is no longer finite, a GPU out of memory. Files written stay as they are."""
    try:
        yield
    except KeyboardInterrupt:  # the second Ctrl-C
        raise LessonError(f"stopped at once at step {state.step}; {state.path} holds the last "
                          f"saved state") from None
    except FloatingPointError as e:
        raise LessonError(f"{e}: stopped without saving it; the last good state ({state.path}) "
                          f"and the earlier student.pt are kept. Try a lower --lr or --dtype "
                          f"fp32") from None
    except torch.cuda.OutOfMemoryError:
        raise LessonError(f"the GPU ran out of memory at step {state.step} (batch {batch_size}): "
                          f"try --batch-size {max(1, batch_size // 2)} --grad-accum "
                          f"{grad_accum * 2} (same effective batch); checkpoints already written "
                          f"are kept") from None
