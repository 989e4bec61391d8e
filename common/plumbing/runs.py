"""Lessons that run other lessons (07's lab, 09's starts): each run of 04 in its own folder, its
output shown as it goes, kept when it was trained with the same recipe, resumed when interrupted.
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys

import torch

from common.plumbing.artifacts import LessonError, load_artifact

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_script(script, flags):
    """Run lesson `script` with these flags, its output shown here line by line; returns (exit code,
    lines). It runs in its own process group, so a Ctrl-C reaches it once, from us: it then finishes
    its step, saves, and stops."""
    proc = subprocess.Popen([sys.executable, "-u", os.path.join(HERE, script), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            print("    " + line, end="")
            lines.append(line)
        return proc.wait(), lines
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        for line in proc.stdout:  # let it save, and show what it says
            print("    " + line, end="")
        proc.wait()
        raise


@contextlib.contextmanager
def gpu_lent(*models):
    """The GPU lent to a run in another process: these models wait on the CPU and the memory torch
    keeps cached for this process is handed back (on a T4, 07's float32 GPT-2 and its cache are
    ~4 GB of the 15 a jsd run needs); afterwards each model goes back where it was."""
    devices = [next(m.parameters()).device for m in models]
    for m in models:
        m.cpu()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        for m, device in zip(models, devices):
            m.to(device)


def run_or_refuse(script, flags, label):
    """run_script; a failure becomes one line that says which run failed and why."""
    try:
        code, lines = run_script(script, flags)
    except KeyboardInterrupt:
        raise LessonError(f"interrupted while training {label}: run it again to go on (finished "
                          f"runs are kept; this one resumes from its saved state, if it saved "
                          f"one)") from None
    if code:
        said = next((ln.strip() for ln in reversed(lines) if ln.startswith("error:")),
                    f"exit code {code}")
        raise LessonError(f"{script} failed for {label} ({said}); the runs before it are kept")


def link(src, dst):
    """dst points at src (a symbolic link, or a copy where links are not allowed)."""
    if os.path.lexists(dst):
        os.remove(dst)
    try:
        os.symlink(os.path.abspath(src), dst)
    except OSError:
        shutil.copyfile(src, dst)


def stamp(path):
    """A file's size and modification time: it changed if either did."""
    return [os.path.getsize(path), os.path.getmtime(path)]


def newer(path, than):
    """Whether `path` exists and was written no earlier than `than`."""
    return os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(than)


def plan_run(out, sub, flags, start, fresh, inputs):
    """"done", "resume" or "fresh" for the 04 run in folder `sub`. Its recipe (the flags, and the
    size and time of each input file in `out` and of the start) is written to method.json when it
    begins: a run counts as done if its train_log.pt is newer than the same recipe, and resumes only
    from a train_state.pt saved under that same recipe (an older recipe's state is never resumed).
    The inputs are linked into `sub`."""
    os.makedirs(sub, exist_ok=True)
    recipe = {"flags": flags, "inputs": {f: stamp(f"{out}/{f}") for f in inputs}}
    if start is not None:
        recipe["start"] = stamp(start)
    done, log, state = f"{sub}/method.json", f"{sub}/train_log.pt", f"{sub}/train_state.pt"
    same = False
    if os.path.exists(done) and not fresh:
        with open(done) as f:
            same = json.load(f) == recipe
    if same and newer(log, done):
        return "done"
    for file in inputs:
        link(f"{out}/{file}", f"{sub}/{file}")
    # (a resumed run keeps method.json's time, which dates the state)
    if same and newer(state, done):
        return "resume"
    with open(done, "w") as f:
        json.dump(recipe, f)
    return "fresh"


def train(label, sub, flags, out, start, fresh, inputs, make=None):
    """Train (or keep, or resume) the 04 run in folder `sub`; returns its train_log. make: 03's
    flags, to make the student first in a fresh run (they are part of the recipe)."""
    plan = plan_run(out, sub, flags if make is None else make + ["|"] + flags, start, fresh, inputs)
    if plan == "done":
        print(f"=== {label}: trained earlier with the same settings, kept ({sub})")
    else:
        if plan == "fresh" and make is not None:
            print(f"=== {label}: python 03_student.py {' '.join(make)}")
            run_or_refuse("03_student.py", make, label)
        resume = ["--resume"] if plan == "resume" else []
        print(f"=== {label}: python 04_train.py {' '.join(flags + resume)}")
        run_or_refuse("04_train.py", flags + resume, label)
    return load_artifact(f"{sub}/train_log.pt", "train_log")
