"""Assemble the six lessons into one Jupyter/Colab notebook, course.ipynb, that runs on its own:
uploaded alone to Colab it writes the course's shared code (common/) beside itself first, one cell
a file; run inside the repository it uses the repository's files and overwrites none. Then a setup
cell (preset, device, precision), and for each lesson a markdown cell (its docstring) and a code
cell (the lesson itself, unchanged). Lessons 07 and 08 run after the course, from a shell.

Reads:  common/*.py, 01_teacher.py ... 06_compare.py
Writes: course.ipynb (or the path given); a test keeps the committed one equal to this output
Run:    python make_notebook.py [course.ipynb]
"""
import ast
import glob
import json
import os
import sys

LESSONS = ["01_teacher.py", "02_generate.py", "03_student.py", "04_train.py", "05_evaluate.py",
           "06_compare.py"]
INTRO = """# Knowledge distillation, from scratch

Six lessons: GPT-2 (124M) writes texts, a 6-layer student learns from them, and perplexities,
charts and side-by-side generations show what it learned. Each code cell below is a whole lesson
script, run in order.

**On Colab:** File > Upload notebook (this file alone is enough), Runtime > Change runtime type >
T4 GPU, then Runtime > Run all. GPT-2's weights are downloaded once. Without a GPU, set
`PRESET = "tiny"` in the setup cell: a small teacher trained on a toy language, a few minutes on a
CPU, offline."""
SHARED = """## The course's shared code (`common/`)

The lessons import these modules (the model, sampling, perplexity, the losses, and the plumbing:
saving files, flags, devices). Each cell writes one file beside this notebook unless the folder
already has it: inside the repository its own files are used and none is overwritten. Collapse
this section; the course starts at **Setup**."""
MAGIC = '''# %%shared_file PATH: this cell's text becomes the file PATH, unless it exists
import os

from IPython.core.magic import register_cell_magic


@register_cell_magic
def shared_file(path, text):
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read().rstrip() != text.rstrip():
                print(f"{path} differs from this notebook's copy: the folder's own is used")
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for file, content in ((os.path.join(os.path.dirname(path), "__init__.py"), ""), (path, text)):
        if not os.path.exists(file):
            with open(file, "w", encoding="utf-8") as f:
                f.write(content.rstrip("\\n") + "\\n" if content else "")'''
SETUP = """!pip install -q tiktoken
import importlib
import os

import torch

importlib.invalidate_caches()  # common/ may have just been written
# "gpt2" is the real course (use a GPU runtime); "tiny" trains a small teacher on a toy language,
# a few minutes anywhere
PRESET = "gpt2"  # <- edit
# a notebook started with KD_PRESET set keeps it; %env KD_PRESET=tiny changes it later
os.environ.setdefault("KD_PRESET", PRESET)
os.environ.setdefault("KD_OUT", "artifacts")  # the folder the lessons pass their .pt files through
from common.plumbing.device import get_device, needs_scaler, pick_dtype  # noqa: E402

device = get_device()
dtype = pick_dtype(device)  # as lesson 04 will choose it
gpu = f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""
print(f"preset: {os.environ['KD_PRESET']} | artifacts in: {os.environ['KD_OUT']} | device: "
      f"{device}{gpu} | trains in {dtype}{' with a GradScaler' if needs_scaler(dtype) else ''}")
if device == "cpu" and os.environ["KD_PRESET"] == "gpt2":
    print("no GPU: Runtime > Change runtime type > T4 GPU, or PRESET = 'tiny' for a CPU run")"""

NEXT = """## Next

From a shell in the repository: `python 07_methods.py` (the divergence lab) and
`python 08_speculative.py` (the student as a speculative-decoding draft)."""


def cell(kind, text, metadata=None):
    c = {"cell_type": kind, "metadata": metadata or {}, "source": text.splitlines(keepends=True)}
    if kind == "code":
        c.update(execution_count=None, outputs=[])
    return c


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "course.ipynb"
    here = os.path.dirname(os.path.abspath(__file__))
    files = glob.glob(os.path.join(here, "common", "**", "*.py"), recursive=True)
    shared = sorted(os.path.relpath(f, here) for f in files
                    if os.path.getsize(f) > 0)  # (the empty __init__.py: written by the magic)
    cells = [cell("markdown", INTRO),
             cell("markdown", SHARED, {"jp-MarkdownHeadingCollapsed": True}), cell("code", MAGIC)]
    cells += [cell("code", f"%%shared_file {f}\n{read(os.path.join(here, f))}") for f in shared]
    cells += [cell("markdown", "## Setup"), cell("code", SETUP)]
    for lesson in LESSONS:
        source = read(os.path.join(here, lesson))
        title, _, rest = ast.get_docstring(ast.parse(source)).partition("\n")
        cells.append(cell("markdown", f"## {title}\n{rest}\n\n(source: `{lesson}`)"))
        cells.append(cell("code", source))
    cells.append(cell("markdown", NEXT))
    for i, c in enumerate(cells, 1):  # nbformat 4.5: every cell has an id
        c["id"] = f"cell-{i}"
    nb = {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                      "language": "python"},
                       "language_info": {"name": "python"}, "accelerator": "GPU",
                       "colab": {"provenance": [], "gpuType": "T4"}}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {path}: {len(cells)} cells")


if __name__ == "__main__":
    main()
