"""Assemble the course into one Jupyter/Colab notebook, course.ipynb, that runs on its own and reads
as the lessons do: each lesson a section of short cells at its natural seams (its settings, a cell
per function with the lesson's own comment above it, then the steps of its main() one cell each),
each idea of common/ shown, in cells, in the lesson that teaches it, the plumbing in one section at
the top, collapsed when the notebook opens. The .py files stay the source: a test keeps the
committed notebook equal to this script's output, and the steps of each main() together are its
body, statement for statement.

Reads:  common/**/*.py, 01_teacher.py ... 10_bytes.py
Writes: course.ipynb (or the path given)
Run:    python make_notebook.py [course.ipynb]
"""
import ast
import glob
import hashlib
import json
import os
import re
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
COURSE = ["01_teacher.py", "02_generate.py", "03_student.py", "04_train.py", "05_evaluate.py",
          "06_compare.py"]
MORE = ["07_methods.py", "08_speculative.py", "09_starts.py", "10_bytes.py"]
AS_COMMANDS = ["03_student.py", "04_train.py"]  # 07 and 09 run these as commands: files too
# which of common/'s ideas each lesson shows, in the order its code needs them (an idea is shown
# once, in the first lesson whose code imports it)
IDEAS = {"01_teacher.py": ["common/tokenizer.py", "common/model.py", "common/gpt2_weights.py",
                           "common/toy_language.py"],
         "02_generate.py": ["common/sampling.py", "common/data.py"],
         "03_student.py": ["common/prune.py"],
         "04_train.py": ["common/distill.py"],
         "05_evaluate.py": ["common/perplexity.py"],
         "08_speculative.py": ["common/speculative.py"]}
PART_LINES = 60  # an idea's file is shown in cells of about this many lines, cut between defs
# how long lessons 07-10 take: the tiny preset measured (bash run_all.sh --preset tiny, then each
# lesson; 2-core x86-64 CPU, torch 2.13.0), a T4 estimated until one is measured
TIMES = {"07_methods.py": "tiny preset: about 10 minutes on 2 CPU cores; a T4: about 30 minutes "
                          "(estimated, not yet measured)",
         "08_speculative.py": "tiny preset: about 2 minutes on 2 CPU cores; a T4: about 5 minutes "
                              "(estimated, not yet measured)",
         "09_starts.py": "tiny preset: about 7 minutes on 2 CPU cores; a T4: about 20 minutes "
                         "(estimated, not yet measured)",
         "10_bytes.py": "tiny preset: about 2.5 minutes on 2 CPU cores; a T4: about 30 minutes "
                        "(estimated, not yet measured)"}

INTRO = """# Knowledge distillation, from scratch

Ten lessons in plain PyTorch. GPT-2 (124M) writes texts, a 6-layer student learns from them, and
perplexities, charts and side-by-side texts show what it learned (lessons 01-06); then the
divergence lab (07), the student as a speculative-decoding draft (08), where a student should
start (09) and a student with its own tokenizer, bytes (10). Each lesson is a section: what it
teaches, its flags in one line (`ARGS`), the ideas of `common/` it introduces, its functions, then
its steps, a cell each.

**On Colab:** File > Upload notebook (this file alone is enough), Runtime > Change runtime type >
T4 GPU, then Runtime > Run all. GPT-2's weights are downloaded once. Without a GPU, set
`PRESET = "tiny"` in the setup cell: a small teacher trained on a toy language, about 70 seconds
of lessons 01-06 on 2 CPU cores, offline.

**Change the course and run it again.** A lesson's flags: edit its `ARGS` line (e.g. `ARGS =
"--kd soft --kd-temperature 2"`; each lesson's `--help` lists them) and run the lesson again from
that cell. An idea's code (the sampler, a loss, the model): edit its cell and run it again; it
rewrites its file in `common/`, and the lessons you run after it (from their first cell) use the
change. A Colab runtime is recycled after a while: the cell after lesson 06 packs what the course
made, to download."""
PLUMBING = """## The plumbing (`common/plumbing/`)

What every lesson needs and none is about: saving and loading the `.pt` files, flags, the device
and the precision, downloads, several processes. Each cell writes one file beside this notebook
(`%%course_file`, defined in the first cell); run them, no need to read them. The course starts at
**Setup**."""
MAGIC = '''# %%course_file PATH [K/N]: this cell is the file PATH (or its part K of N: the file is
# written when all N have run). A file of the folder that differs from this notebook's copy and
# was changed outside it is kept. After a file is written, the course's modules are imported
# afresh.
import hashlib
import os
import sys

from IPython.core.magic import register_cell_magic

ORIGINAL = {}  # path -> sha256 of the file this notebook was made from (make_notebook.py)
PARTS, WRITTEN = {}, {}  # path -> {k: text}; path -> the text this notebook last wrote


@register_cell_magic
def course_file(line, cell):
    path, _, part = line.partition(" ")
    k, n = (int(v) for v in part.split("/")) if part else (1, 1)
    PARTS.setdefault(path, {})[k] = cell.rstrip("\\n")
    if len(PARTS[path]) < n:
        return  # the file is written when its last part has run
    text = "\\n\\n\\n".join(PARTS[path][i] for i in range(1, n + 1)) + "\\n"
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            current = f.read()
        if current == text:
            return
        ours = hashlib.sha256(current.encode()).hexdigest() == ORIGINAL.get(path)
        if not ours and current != WRITTEN.get(path):
            print(f"{path} was changed outside this notebook: that one is kept (delete it to use "
                  f"this cell)")
            return
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    for package in {"common", folder} - {""}:  # common/ and its plumbing: an empty __init__.py
        if not os.path.exists(os.path.join(package, "__init__.py")):
            open(os.path.join(package, "__init__.py"), "w").close()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    WRITTEN[path] = text
    for name in [m for m in sys.modules if m == "common" or m.startswith("common.")]:
        del sys.modules[name]  # the lessons run after this import the file as it is now'''
SETUP = '''# Edit and run again: every setting takes effect at once.
PRESET = "gpt2"       # "gpt2": the real course (use a GPU runtime); "tiny": a small teacher on a
#                       toy language, about 70 s on 2 CPU cores, offline
OUT = "artifacts"     # the folder the lessons pass their .pt files through
MORE_LESSONS = False  # True: "Run all" goes on after the course to lessons 07-10 (see their times)
import importlib.util
import os
import sys

import torch
from IPython import get_ipython

if importlib.util.find_spec("tiktoken") is None:  # (Colab has none: GPT-2's tokenizer, once)
    get_ipython().system("pip install -q tiktoken")
os.environ["KD_PRESET"], os.environ["KD_OUT"] = PRESET, OUT
importlib.invalidate_caches()  # common/ may have just been written
from common.plumbing.device import get_device, pick_dtype  # noqa: E402


class StopRunAll(Exception):
    """Where "Run all" ends when MORE_LESSONS is False: said in one line."""

    def _render_traceback_(self):  # (the course's own errors say themselves so too)
        return [f"error: {self}"]


def out_of_memory(shell, etype, value, tb, tb_offset=None):
    """A GPU out of memory: one line that says what to lower, not torch's traceback."""
    print("error: the GPU ran out of memory: a smaller --batch-size in this lesson's ARGS, or "
          "Runtime > Restart session; files already written are kept", file=sys.stderr)


get_ipython().set_custom_exc((torch.cuda.OutOfMemoryError,), out_of_memory)
device = get_device()
dtype = pick_dtype(device)  # as lesson 04 will choose it
gpu = f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""
print(f"preset: {PRESET} | artifacts in: {OUT} | device: {device}{gpu} | trains in {dtype}"
      f"{' with a GradScaler' if dtype == 'fp16' else ''}")
if device == "cpu" and PRESET == "gpt2":
    print("no GPU: Runtime > Change runtime type > T4 GPU, or PRESET = 'tiny' for a CPU run")'''
PACK = '''# What the course made, in one zip to download before the runtime is recycled: the
# reports, charts and the files a lesson can go on from (the teacher, 500 MB for GPT-2, is
# downloaded again in a second; train_state.pt is for resuming an interrupted 04)
import shutil

kept = "course_results"
shutil.rmtree(kept, ignore_errors=True)
shutil.copytree(OUT, kept, ignore=shutil.ignore_patterns("teacher.pt", "train_state*.pt",
                                                         "student_last.pt", "*.tmp-*"))
archive = shutil.make_archive(kept, "zip", kept)
print(f"wrote {archive} ({os.path.getsize(archive) / 1e6:.1f} MB)")
try:
    from google.colab import files  # on Colab: to your computer
    files.download(archive)
except ImportError:
    pass'''
AS_FILES = """#### Lessons 03 and 04 as files

Lessons 07 and 09 run lesson 03 and lesson 04 as commands, once for each method, rate, seed and
start, each run in its own folder: these two cells write them as files (the same code as their
sections above). Run them, no need to read them."""
MORE_INTRO = """## After the course: lessons 07 to 10

Longer experiments on what the course built: the divergence lab (07), the student as a
speculative-decoding draft (08), where a student should start (09), and a byte-level student, with
a tokenizer of its own (10). "Run all" stops at the
next cell unless `MORE_LESSONS = True` in the setup cell; or run from here (Runtime > Run cell and
below).
"""
STOP = '''if not MORE_LESSONS:
    raise StopRunAll("lessons 07-10 are not run by Run all: set MORE_LESSONS = True in the setup "
                     "cell and run it, or run from the next cell")'''


def cell(kind, text, **metadata):
    c = {"cell_type": kind, "metadata": metadata, "source": text.splitlines(keepends=True)}
    if kind == "code":
        c.update(execution_count=None, outputs=[])
    return c


def read(path):
    with open(os.path.join(HERE, path), encoding="utf-8") as f:
        return f.read()


# --- a file cut into parts at top-level definitions ---
def parts_of(text):
    """The file's text in parts of at most about PART_LINES lines (a longer definition alone), cut
    only where two blank lines stand before a top-level definition (and its comment): so
    "\n\n\n".join(parts) + "\n" is the file again."""
    lines = text.rstrip("\n").split("\n")
    starts = []
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            start = node.lineno - 1 - len(node.decorator_list)
            while start > 0 and lines[start - 1].startswith("#"):  # its comment goes with it
                start -= 1
            if start >= 2 and lines[start - 1] == lines[start - 2] == "":
                starts.append(start)
    cuts, candidate = [0], None
    for start in starts + [len(lines) + 2]:  # cut before the part would grow past PART_LINES
        if start - cuts[-1] > PART_LINES and candidate is not None and candidate > cuts[-1]:
            cuts.append(candidate)
        candidate = start
    ends = [c - 2 for c in cuts[1:]] + [len(lines)]  # (the two blank lines go between the parts)
    parts = ["\n".join(lines[a:b]) for a, b in zip(cuts, ends)]
    assert "\n\n\n".join(parts) + "\n" == text, "a file is its parts again"
    return parts


def idea_cells(path):
    """An idea's file as cells: what it is (its docstring's first line), then its parts."""
    text = read(path)
    title = ast.get_docstring(ast.parse(text)).splitlines()[0].rstrip(".")
    parts = parts_of(text)
    cells = [cell("markdown", f"### `{path}`: {title}")]
    for k, part in enumerate(parts, 1):
        names = [n.name for n in ast.parse(part).body
                 if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        head = f"%%course_file {path}" + (f" {k}/{len(parts)}" if len(parts) > 1 else "")
        if k > 1 and names:
            cells.append(cell("markdown", ", ".join(f"`{n}`" for n in names)))
        cells.append(cell("code", f"{head}\n{part}"))
    return cells


# --- a lesson cut at its seams ---
RULER = re.compile(r"^# --- (.*) ---$")


def comment_markdown(lines):
    """Comment lines as markdown: a ruler (# --- x ---) as a heading, the others as a paragraph."""
    out, paragraph = [], []
    for line in lines:
        ruler = RULER.match(line)
        if ruler:
            out.append(f"#### {ruler.group(1)[0].upper()}{ruler.group(1)[1:]}")
        else:
            paragraph.append(line.lstrip("#").strip())
    if paragraph:
        out.append(" ".join(paragraph))
    return "\n\n".join(out)


def prose(text):
    """A docstring's text as markdown: its paragraphs joined up, its indented lines a list."""
    out = []
    for line in text.strip().split("\n"):
        if line.startswith("  "):
            out.append("- " + " ".join(line.split()))
        elif out and line.strip() and not out[-1].startswith("- ") and out[-1]:
            out[-1] += " " + line.strip()
        else:
            out.append(line.strip())
    return "\n".join(out)


def heading(doc, note=""):
    """The lesson's heading (its first sentence), what it teaches, Reads/Writes/Run as a list."""
    teaching, _, files = doc.partition("\nReads:")
    title, rest = re.split(r"(?<=[.?!])\s", teaching, maxsplit=1)  # its first sentence
    title = title.rstrip(".")
    fields = re.split(r"\n(Writes|Run):", "Reads:" + files)
    items = [("Reads", fields[0][len("Reads:"):])] + list(zip(fields[1::2], fields[2::2]))
    listed = "\n".join(f"- **{name}:** {' '.join(value.split())}" for name, value in items)
    return f"## {title}\n\n" + (f"*{note}*\n\n" if note else "") + f"{prose(rest)}\n\n{listed}"


def lesson_cells(path, note=""):
    """A lesson's cells: its heading, its ARGS line, its ideas, its imports and settings, a cell per
    top-level function (its comment above it as markdown), then the steps of main(), a cell each."""
    text = read(path)
    tree = ast.parse(text)
    lines = text.split("\n")
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    cells = [cell("markdown", heading(ast.get_docstring(tree), note)),
             cell("code", f'ARGS = ""  # this lesson\'s flags, as in a shell: python {path} --help '
                          f'lists them')]
    for idea in IDEAS.get(path, []):
        cells += idea_cells(idea)

    def above(node):  # the first line of a node, its decorators and the comment just above it
        start = node.lineno - 1 - len(getattr(node, "decorator_list", []))
        comment = start
        while comment > 0 and lines[comment - 1].startswith("#"):
            comment -= 1
        return comment, start

    first = above(defs[0])[0]
    body_start = tree.body[1].lineno - 1  # after the docstring
    cells.append(cell("code", "\n".join(lines[body_start:first]).strip("\n")))
    for node in defs:
        comment, start = above(node)
        if node.name == "main":
            cells += step_cells(lines[node.lineno:node.end_lineno], lines[comment:start])
            continue
        if comment < start:
            cells.append(cell("markdown", comment_markdown(lines[comment:start])))
        cells.append(cell("code", "\n".join(lines[start:node.end_lineno])))
    return cells


def step_cells(body, comment):
    """main()'s body, dedented, a cell per step: cut at its own rulers (# --- x ---)."""
    body = textwrap.dedent("\n".join(body)).split("\n")
    cells = [cell("markdown", comment_markdown(comment) or "#### The lesson, step by step")]
    step = []
    for line in body + ["# --- end ---"]:
        ruler = RULER.match(line)
        if ruler and "\n".join(step).strip():
            cells.append(cell("code", "\n".join(step).strip("\n")))
            step = []
        if ruler:
            cells.append(cell("markdown", comment_markdown([line])))
        else:
            step.append(line)
    return cells[:-1]


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "course.ipynb"
    plumbing = sorted(os.path.relpath(f, HERE) for f in
                      glob.glob(os.path.join(HERE, "common", "plumbing", "*.py"))
                      if os.path.getsize(f) > 0)  # (the empty __init__.py: written by the magic)
    shown = {f for ideas in IDEAS.values() for f in ideas}
    ideas = sorted(os.path.relpath(f, HERE) for f in glob.glob(os.path.join(HERE, "common", "*.py"))
                   if os.path.getsize(f) > 0)
    assert set(ideas) == shown, f"every idea shown in a lesson: {set(ideas) ^ shown}"
    original = {f: hashlib.sha256(read(f).encode()).hexdigest()
                for f in plumbing + ideas + AS_COMMANDS}
    magic = MAGIC.replace("ORIGINAL = {}", "ORIGINAL = " + json.dumps(original, indent=1))
    cells = [cell("markdown", INTRO),
             cell("markdown", PLUMBING, **{"jp-MarkdownHeadingCollapsed": True,
                                           "heading_collapsed": True, "id": "plumbing"}),
             cell("code", magic)]
    cells += [cell("code", f"%%course_file {f}\n{read(f)}".rstrip("\n")) for f in plumbing]
    cells += [cell("markdown", "## Setup"), cell("code", SETUP)]
    for lesson in COURSE:
        cells += lesson_cells(lesson)
    cells += [cell("markdown", "## Keep what the course made"), cell("code", PACK),
              cell("markdown", MORE_INTRO), cell("code", STOP),
              cell("markdown", AS_FILES, **{"jp-MarkdownHeadingCollapsed": True,
                                            "heading_collapsed": True, "id": "lesson-files"})]
    cells += [cell("code", f"%%course_file {f}\n{read(f)}".rstrip("\n")) for f in AS_COMMANDS]
    for lesson in MORE:
        cells += lesson_cells(lesson, f"Time: {TIMES[lesson]}.")
    cells += [cell("markdown", "## Keep what lessons 07-10 made too"), cell("code", PACK)]
    for i, c in enumerate(cells, 1):  # nbformat 4.5: every cell has an id (Colab reads metadata.id)
        c["id"] = c["metadata"].setdefault("id", f"cell-{i}")
    nb = {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                      "language": "python"},
                       "language_info": {"name": "python"}, "accelerator": "GPU",
                       "colab": {"provenance": [], "gpuType": "T4",
                                 "collapsed_sections": ["plumbing", "lesson-files"]}}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(nb, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {path}: {len(cells)} cells")


if __name__ == "__main__":
    main()
