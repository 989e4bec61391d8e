"""Command-line flags that work from a shell and inside a notebook cell.

A Jupyter/Colab kernel starts Python as `ipykernel_launcher.py -f .../kernel-XXXX.json`, so sys.argv
holds the kernel's arguments, not ours. In a notebook a lesson's flags are the string ARGS of the
notebook ("--kd soft --kd-temperature 2", each lesson's section sets it); the preset and the folder
come from KD_PRESET and KD_OUT (the setup cell sets them; `%env KD_PRESET=tiny` also works).
"""
import argparse
import os
import shlex
import sys

from common.plumbing.errors import LessonError


def default_preset():
    """gpt2: the real course; tiny: a small stand-in teacher for CPU/offline runs. Read when a
    lesson parses its flags (not at import), so `%env KD_PRESET=tiny` in a notebook takes effect at
    once."""
    return os.environ.get("KD_PRESET", "gpt2")


def default_out():
    """The folder the lessons pass their .pt files through."""
    return os.environ.get("KD_OUT", "artifacts")


def in_notebook():
    """True inside a Jupyter/Colab kernel: its launcher is argv[0], or an IPython shell with a
    kernel is running (importing ipykernel, as a test harness may, is not enough)."""
    launcher = os.path.basename(sys.argv[0]) if sys.argv else ""
    ipython = sys.modules.get("IPython")
    get_shell = getattr(ipython, "get_ipython", None) if ipython is not None else None
    shell = get_shell() if get_shell is not None else None
    return launcher.endswith("_launcher.py") or getattr(shell, "kernel", None) is not None


def preset_advice(preset):
    """How to choose a preset, said as it works here: a flag in a shell, %env in a notebook."""
    return f"run %env KD_PRESET={preset} in a cell" if in_notebook() else f"add --preset {preset}"


class _HelpWithDefaults(argparse.HelpFormatter):
    """--help says every flag's default: appended where the help text does not already say it (flags
    whose default comes from the preset say "gpt2: .., tiny: .." instead; switches need none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        no_default = action.default is None or action.default is False
        if no_default or action.default == argparse.SUPPRESS or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def first_sentences(doc, at_least=60):
    """The docstring's first whole sentences, at least `at_least` characters of them (so "Lesson 04:
    distillation." brings the sentence that says what it does), whatever the line breaks."""
    lines = (doc or "").strip().splitlines()  # a notebook cell may have no __doc__
    for i, line in enumerate(lines):  # a line ending in ":" introduces a list: the text stops there
        if line.rstrip().endswith(":"):
            lines = lines[:i] + [line.rstrip()[:-1] + "."]
            break
    text = " ".join(" ".join(lines).split())
    end = text.find(". ")
    while 0 <= end < at_least:
        end = text.find(". ", end + 1)
    return text if end < 0 else text[:end + 1]


def lesson_parser(description):
    """An ArgumentParser with the two flags every lesson shares: --out and --preset."""
    # allow_abbrev=False: argparse would otherwise take --epoch for --epochs, silently
    p = argparse.ArgumentParser(description=first_sentences(description) or None,
                                allow_abbrev=False, formatter_class=_HelpWithDefaults)
    p.add_argument("--out", default=default_out(),
                   help="folder for the artifacts (default: %(default)s)")
    p.add_argument("--preset", default=default_preset(), choices=["gpt2", "tiny"],
                   help="gpt2: the real course; tiny: a small teacher that knows a toy language, "
                        "about 70 s on 2 CPU cores (default: %(default)s)")
    return p


def notebook_args():
    """The flags of the lesson a notebook runs: its ARGS string, split as a shell would."""
    from IPython import get_ipython
    shell = get_ipython()
    return shlex.split(str(shell.user_ns.get("ARGS", ""))) if shell is not None else []


def parse(parser, presets=None):
    """Parse the flags (in a notebook, its ARGS); flags left unset (None) take the chosen preset's
    values."""
    args = parser.parse_args(notebook_args() if in_notebook() else sys.argv[1:])
    for name, value in (presets or {}).get(args.preset, {}).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# --- argument types: a bad value is refused at parse time with argparse's own message ---

def _number(kind, lo=None, hi=None, lo_open=False, hi_open=False):
    def check(text):
        try:
            x = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        if x != x or (lo is not None and (x <= lo if lo_open else x < lo)) or \
                (hi is not None and (x >= hi if hi_open else x > hi)):
            left = ("(" if lo_open else "[") + ("-inf" if lo is None else str(lo))
            right = ("inf" if hi is None else str(hi)) + (")" if hi_open else "]")
            raise argparse.ArgumentTypeError(f"{text} is out of range {left}, {right}")
        return x
    return check


positive_int = _number(int, lo=1)
nonneg_int = _number(int, lo=0)
positive_float = _number(float, lo=0, lo_open=True)
nonneg_float = _number(float, lo=0)
unit_float = _number(float, lo=0, hi=1)                           # [0, 1]
prob_float = _number(float, lo=0, hi=1, lo_open=True)              # (0, 1]
fraction = _number(float, lo=0, hi=1, hi_open=True)                # [0, 1)


def existing_file(text):
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return text


def existing_path(text):
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return text


def names_among(text, known, what):
    """The names of a comma-separated flag value ("seq,uld"), each one of `known`; any other, or
    none, refused in one line that lists them."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise LessonError(f"unknown {what} {', '.join(unknown) or '(none)'}: choose among "
                          f"{', '.join(known)}")
    return names


def positive_floats(text):
    """A comma-separated list of positive numbers ("1e-3,3e-3"), as a list of floats."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} holds no number")
    return [positive_float(t) for t in items]
