"""Assemble the six lessons into one Jupyter/Colab notebook, course.ipynb: for each lesson a
markdown cell (its docstring) and a code cell (the lesson itself, unchanged), after a setup cell.
Lessons 07 (the divergence lab, which trains 46 students on the tiny preset) and 08 (speculative
decoding with the students as drafts) run after the course: paste them into cells, or run them
from a shell.

Reads:  01_teacher.py ... 06_compare.py
Writes: course.ipynb (or the path given)
Run:    python make_notebook.py [course.ipynb]
"""
import ast
import json
import sys

LESSONS = ["01_teacher.py", "02_generate.py", "03_student.py", "04_train.py", "05_evaluate.py",
           "06_compare.py"]
SETUP = """# Run this notebook from the course folder (upload or clone it first), e.g.
# %cd /content/kd
!pip install -q tiktoken
import os
# "gpt2" is the real course (use a GPU runtime); "tiny" trains a small teacher on a toy language,
# about a minute anywhere
PRESET = "gpt2"  # <- edit
# a notebook started with KD_PRESET set keeps it; %env KD_PRESET=tiny changes it later
os.environ.setdefault("KD_PRESET", PRESET)
os.environ.setdefault("KD_OUT", "artifacts")  # the folder the lessons pass their .pt files through
print("preset:", os.environ["KD_PRESET"], "| artifacts in:", os.environ["KD_OUT"])"""


def cell(kind, text):
    c = {"cell_type": kind, "metadata": {}, "source": text.splitlines(keepends=True)}
    if kind == "code":
        c.update(execution_count=None, outputs=[])
    return c


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "course.ipynb"
    intro = ("# Knowledge distillation, from scratch\n\nSix lessons: GPT-2 teaches a smaller "
             "student. Run the cells in order; each one is a whole lesson script.")
    cells = [cell("markdown", intro), cell("code", SETUP)]
    for lesson in LESSONS:
        with open(lesson, encoding="utf-8") as f:
            source = f.read()
        doc = ast.get_docstring(ast.parse(source))
        title, _, rest = doc.partition("\n")
        cells.append(cell("markdown", f"## {title}\n{rest}\n\n(source: `{lesson}`)"))
        cells.append(cell("code", source))
    for i, c in enumerate(cells, 1):  # nbformat 4.5: every cell has an id
        c["id"] = f"cell-{i}"
    nb = {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                      "language": "python"},
                       "language_info": {"name": "python"}, "accelerator": "GPU"}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
    print(f"wrote {path}: {len(cells)} cells")


if __name__ == "__main__":
    main()
