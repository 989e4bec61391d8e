"""course.ipynb as a learner reads and runs it: generated from the lessons and common/ (each lesson's
cells are its code again, each idea's cells its file), short cells, each idea in the lesson that
teaches it and before any lesson that needs it, the plumbing collapsed; an edited idea cell changes
the lessons run after it; the setup cell takes effect when run again; one line, not a traceback,
for a missing tokenizer offline; lessons 07-10 when chosen. (The tiny course run through the
notebook: test_course.py.)"""
import ast
import glob
import json
import os
import re
import shutil

import nbformat
import pytest
import torch

from conftest import ROOT, as_a_learner_sets_it, cell_text, load_lesson, run_notebook, run_py

MAKE = load_lesson("make_notebook.py")
LESSONS = MAKE.COURSE + MAKE.MORE


def committed():
    return nbformat.read(os.path.join(ROOT, "course.ipynb"), as_version=4)


def test_the_committed_notebook_is_make_notebooks_output(tmp_path):
    r = run_py(["make_notebook.py", str(tmp_path / "course.ipynb")])
    assert r.returncode == 0, r.stderr
    with open(os.path.join(ROOT, "course.ipynb"), encoding="utf-8") as f:
        assert (tmp_path / "course.ipynb").read_text(encoding="utf-8") == f.read(), \
            "course.ipynb is out of date: run python make_notebook.py"


def without_docstring(tree):
    body = tree.body[1:] if ast.get_docstring(tree) is not None else tree.body
    return ast.dump(ast.Module(body=body, type_ignores=[]))


@pytest.mark.parametrize("lesson", LESSONS)
def test_a_lessons_cells_are_the_lesson_again(lesson):
    """Its code cells, in order: its ARGS line, its ideas' files (%%course_file), its imports and
    settings, its functions, then the steps of main(): with the steps put back into main() and the
    script's last line added, the same program as the .py, statement for statement."""
    cells = MAKE.lesson_cells(lesson)
    code = [c for c in cells if c["cell_type"] == "code"]
    lesson_code = [("".join(c["source"])) for c in code if not "".join(c["source"]).startswith("%%")]
    args, settings, *rest = lesson_code
    assert args.startswith('ARGS = ""  #')
    tree = ast.parse(open(os.path.join(ROOT, lesson), encoding="utf-8").read())
    n_defs = sum(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in tree.body) - 1  # not main
    functions, steps = rest[:n_defs], rest[n_defs:]
    main = "def main():\n" + "\n".join("    " + line if line else line
                                       for step in steps for line in step.split("\n"))
    last = next(n for n in tree.body if isinstance(n, ast.If))  # if __name__ == "__main__": ...
    again = "\n\n".join([settings, *functions, main, ast.unparse(last)])
    assert without_docstring(ast.parse(again)) == without_docstring(tree)
    assert all(len(c.split("\n")) <= 80 for c in lesson_code), [len(c.split("\n")) for c in lesson_code]
    doc = ast.get_docstring(tree)
    title = re.split(r"(?<=[.?!])\s", doc, maxsplit=1)[0].rstrip(".")  # its first sentence, whole
    assert not any(title in c for c in lesson_code)  # the docstring: its markdown only
    heading = "".join(cells[0]["source"])
    assert heading.startswith(f"## {title}\n") and "- **Reads:**" in heading
    assert "- **Writes:**" in heading and "- **Run:**" in heading


@pytest.mark.parametrize("path", sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "common", "**", "*.py"), recursive=True)
                                        if os.path.getsize(p)))
def test_each_file_of_common_is_its_cells_again(path):
    """An idea's file cut into cells at its definitions, a plumbing file whole: joined, the file to
    the byte (the magic joins parts with the two blank lines they were cut at)."""
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    cells = ["".join(c["source"]) for c in committed().cells if c["cell_type"] == "code"
             and c["source"].startswith(f"%%course_file {path}")]
    parts = [c.split("\n", 1)[1].rstrip("\n") for c in cells]
    assert parts and "\n\n\n".join(parts) + "\n" == text
    assert all(c.split("\n", 1)[0] == f"%%course_file {path}" + (f" {k}/{len(parts)}" if len(parts) > 1 else "")
               for k, c in enumerate(cells, 1))


def imports_of(path, seen=None):
    """The modules of common/ a file needs to be imported, itself included: its imports, theirs..."""
    seen = set() if seen is None else seen
    if path in seen:
        return seen
    seen.add(path)
    for n in ast.walk(ast.parse(open(os.path.join(ROOT, path), encoding="utf-8").read())):
        modules = ([n.module] if isinstance(n, ast.ImportFrom) and n.module else
                   [a.name for a in n.names] if isinstance(n, ast.Import) else [])
        if isinstance(n, ast.ImportFrom) and n.module == "common":  # from common import toy_language
            modules = [f"common.{a.name}" for a in n.names]
        for m in modules:
            if m.startswith("common.") and os.path.exists(os.path.join(ROOT, *m.split(".")) + ".py"):
                imports_of(os.path.join(*m.split(".")) + ".py", seen)
    return seen


def test_each_idea_is_shown_in_its_lesson_before_any_lesson_needs_it():
    """The model in 01, sampling in 02, pruning in 03, the losses in 04, perplexity in 05, speculative
    decoding in 08; every idea shown once; and uploaded alone, no lesson imports an idea (through
    the plumbing too) that a later section writes."""
    where = {idea: LESSONS.index(lesson) for lesson, ideas in MAKE.IDEAS.items() for idea in ideas}
    assert [where[f"common/{m}.py"] for m in ("model", "sampling", "prune", "distill", "perplexity",
                                              "speculative")] == [0, 1, 2, 3, 4, 7]
    ideas = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "common", "*.py")) if os.path.getsize(p)}
    assert set(where) == ideas
    for i, lesson in enumerate(LESSONS):
        late = {m for m in imports_of(lesson) if m in where and where[m] > i}
        assert not late, f"{lesson} needs {late}, written by a later lesson's section"


def test_the_notebook_reads_as_lessons_and_opens_with_the_plumbing_collapsed():
    """About a third of the code at most before lesson 01 (the plumbing); its section collapsed on
    opening in Colab (metadata.colab.collapsed_sections names its heading) and JupyterLab; no stale
    counts in the prose."""
    nb = json.load(open(os.path.join(ROOT, "course.ipynb"), encoding="utf-8"))
    cells = nb["cells"]
    first = next(i for i, c in enumerate(cells) if "".join(c["source"]).startswith("## Lesson 01"))
    lines = [len("".join(c["source"]).split("\n")) if c["cell_type"] == "code" else 0 for c in cells]
    assert sum(lines[:first]) <= 0.36 * sum(lines), (sum(lines[:first]), sum(lines))
    plumbing = next(c for c in cells if "".join(c["source"]).startswith("## The plumbing"))
    assert plumbing["metadata"]["id"] in nb["metadata"]["colab"]["collapsed_sections"]
    assert plumbing["metadata"]["jp-MarkdownHeadingCollapsed"] is True
    assert all(c["id"] == c["metadata"]["id"] for c in cells)
    prose = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert "Ten lessons" in prose and "Nine lessons" not in prose and "from a shell in the repository" not in prose
    headings = [c for c in cells if "".join(c["source"]).startswith("## Lesson ")]
    assert len(headings) == len(LESSONS)
    times = load_lesson("make_notebook.py").TIMES  # lessons 07-10 say under their heading how long they take
    said = {"".join(h["source"])[10:12]: "".join(h["source"]) for h in headings}
    assert sorted(times) == [f"{n}_{name}.py" for n, name in (("07", "methods"), ("08", "speculative"),
                                                             ("09", "starts"), ("10", "bytes"))]
    assert all(f"Time: {times[f]}." in said[f[:2]] for f in times)


def test_every_section_to_run_not_read_opens_collapsed_in_colab_and_jupyterlab(tmp_path, monkeypatch):
    """The sections whose cells only write files the lessons do not teach (the plumbing, lessons 03
    and 04 written as files for 07 and 09) open collapsed, in Colab (metadata.colab.collapsed_sections
    names each heading's id) and in JupyterLab; no lesson or idea is hidden. From make_notebook.py's
    output of now. Fails with a section left out of Colab's list."""
    monkeypatch.setattr("sys.argv", ["make_notebook.py", str(tmp_path / "course.ipynb")])
    MAKE.main()
    nb = json.load(open(tmp_path / "course.ipynb", encoding="utf-8"))
    text = ["".join(c["source"]) for c in nb["cells"]]
    heads = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "markdown" and text[i].startswith("#")]
    to_run, to_read = set(), set()
    for i, end in zip(heads, heads[1:] + [len(text)]):
        code = [t for c, t in zip(nb["cells"][i + 1:end], text[i + 1:end]) if c["cell_type"] == "code"]
        writes = [t.split()[1] for t in code if t.startswith("%%course_file ")]
        taught = [f for f in writes if re.fullmatch(r"common/[^/]+\.py", f)]
        files_only = all(t.startswith(("%%course_file ", "# %%course_file ")) for t in code)
        (to_run if code and files_only and not taught else to_read).add(nb["cells"][i]["metadata"]["id"])
    assert "plumbing" in to_run and len(to_run) >= 2, to_run
    assert set(nb["metadata"]["colab"]["collapsed_sections"]) == to_run
    collapsed = {c["metadata"]["id"] for c in nb["cells"]
                 if c["metadata"].get("jp-MarkdownHeadingCollapsed") and c["metadata"].get("heading_collapsed")}
    assert collapsed == to_run


@pytest.mark.parametrize("gpu, said", [
    (None, "device: cpu | trains in fp32\nno GPU: Runtime > Change runtime type > T4 GPU"),
    ("T4", "device: cuda (Tesla T4) | trains in fp16 with a GradScaler\n"),
    ("A100", "device: cuda (NVIDIA A100-SXM4-40GB) | trains in bf16\n")], ids=["cpu", "T4", "A100"])
def test_the_setup_cell_names_the_gpu_it_runs_on_and_the_precision_04_will_use(monkeypatch, capsys, gpu, said):
    """The setup cell as make_notebook.py writes it, run with torch.cuda mocked: on Colab's T4 its line
    names the GPU and fp16 with a GradScaler, on an A100 bf16; on a CPU, no name and what to do for
    a GPU (the gpt2 preset). Fails with the GPU's name left out (on a CPU it is empty either way)."""
    import IPython
    from test_gpu import mock_gpu
    if gpu:
        mock_gpu(monkeypatch, gpu)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    shell = type("Shell", (), {"system": lambda self, cmd: None, "set_custom_exc": lambda self, *a: None})()
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    for name in ("KD_PRESET", "KD_OUT"):  # (the cell sets them: put back afterwards)
        monkeypatch.setenv(name, "")
    exec(compile(MAKE.SETUP, "setup cell", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("preset: gpt2 | artifacts in: artifacts | " + said), out
    assert ("no GPU" in out) == (gpu is None)


def first_cells(nb, upto):
    """The notebook's cells before the first one whose source starts with `upto`."""
    return nb.cells[:next(i for i, c in enumerate(nb.cells) if c.source.startswith(upto))]


def test_an_edited_idea_cell_changes_the_lessons_run_after_it(tmp_path):
    """The learner edits the part of common/model.py that holds GPTConfig and runs it again: the file
    is written anew and every module imported after it, the plumbing's and `from common import model`
    included, sees the change,
    and again after a second edit. A file of the folder changed outside the notebook is kept, and
    says so."""
    nb = committed()
    upto = first_cells(nb, "## Lesson 02")  # the plumbing, setup and lesson 01's ideas
    cells = [c for c in upto if c.source.startswith(("%%course_file", "# %%course_file"))
             or "\nPRESET = " in c.source]
    edited = next(c for c in cells if c.source.startswith("%%course_file common/model.py")
                  and "class GPTConfig" in c.source)
    assert "    n_layer: int = 12 " in edited.source
    check = nbformat.v4.new_code_cell("from common import model\n"  # first: the package's attribute, too
                                      "from common.model import GPTConfig\nfrom common.plumbing import artifacts\n"
                                      "print(GPTConfig().n_layer, artifacts.GPTConfig().n_layer, model.GPTConfig().n_layer)")
    again = nbformat.v4.new_code_cell(edited.source.replace("    n_layer: int = 12 ", "    n_layer: int = 3 "))
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "prune.py").write_text("# this folder's own prune.py\n")  # changed outside
    prune = [c for c in nb.cells if c.source.startswith("%%course_file common/prune.py")]
    check_again = nbformat.v4.new_code_cell(check.source)
    # and edited a second time: the file the notebook wrote itself is not "changed outside" it
    twice = nbformat.v4.new_code_cell(edited.source.replace("    n_layer: int = 12 ", "    n_layer: int = 5 "))
    check_twice = nbformat.v4.new_code_cell(check.source)
    nb.cells = [*cells, check, again, check_again, twice, check_twice, *prune]
    run_notebook(as_a_learner_sets_it(nb, more=True), {}, folder=tmp_path)
    assert cell_text(check).split() == ["12"] * 3 and cell_text(check_again).split() == ["3"] * 3
    assert cell_text(check_twice).split() == ["5"] * 3
    assert "    n_layer: int = 5 " in (tmp_path / "common" / "model.py").read_text()
    assert (tmp_path / "common" / "prune.py").read_text() == "# this folder's own prune.py\n"
    assert "common/prune.py was changed outside this notebook: that one is kept" in cell_text(prune[-1])


def test_the_setup_cell_takes_effect_when_run_again(tmp_path):
    """PRESET edited after a first run, the cell run again: the new preset, said and used."""
    nb = committed()
    cells = [c for c in first_cells(nb, "## Lesson 01") if c.cell_type == "code"]
    setup = cells[-1]
    again = nbformat.v4.new_code_cell(setup.source.replace('PRESET = "gpt2"', 'PRESET = "tiny"'))
    show = nbformat.v4.new_code_cell("from common.plumbing.cli import default_preset\nprint(default_preset())")
    nb.cells = [*cells, show, again, nbformat.v4.new_code_cell(show.source)]
    run_notebook(nb, {"KD_PRESET": "gpt2"}, folder=tmp_path)
    assert "preset: gpt2" in cell_text(setup) and cell_text(nb.cells[-3]).strip() == "gpt2"
    assert "preset: tiny" in cell_text(again) and cell_text(nb.cells[-1]).strip() == "tiny"


def test_without_the_tokenizer_and_offline_lesson_01_says_so_in_one_line(tmp_path):
    """Uploaded alone to a local Jupyter without internet and without tiktoken's cache: lesson 01's
    first use of the tokenizer ends in one line that says what to do, not a traceback."""
    nb = committed()
    cells = [c for c in first_cells(nb, "## Lesson 02") if c.cell_type == "code"]
    nb.cells = cells
    dead = "http://127.0.0.1:9"  # nothing listens there: every download fails at once
    run_notebook(as_a_learner_sets_it(nb, more=True),
                 {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty"), "HTTPS_PROXY": dead,
                  "HTTP_PROXY": dead, "https_proxy": dead, "http_proxy": dead},
                 folder=tmp_path, allow_errors=True)
    failed = next(c for c in nb.cells if any(o.output_type == "error" for o in c.outputs))
    error, = [o for o in failed.outputs if o.output_type == "error"]
    said, = error.traceback  # one line, no traceback: all "Run all" shows before it stops
    assert said.startswith("error: GPT-2's tokenizer") and "could not download" in said, said


@pytest.mark.slow
def test_lessons_07_to_10_run_in_the_notebook_when_chosen(course, tmp_path):
    """After the course: "Run all" stops at the cell before lesson 07, in one line, unless
    MORE_LESSONS; chosen, lessons 07 to 10 run from the notebook, 07 and 09 running 03 and 04
    as commands from the files the notebook writes, each with its ARGS line set (one method, one
    start, a few steps, on the course cut to 8 training texts)."""
    from test_train import keep_train_samples
    out, _, _ = course
    shutil.copytree(out.parent / "common", tmp_path / "common")
    shutil.copytree(out, tmp_path / "artifacts")
    keep_train_samples(tmp_path / "artifacts", 8, n_val=2, n_test=4)
    nb = committed()
    magic = next(c for c in nb.cells if c.source.startswith("# %%course_file"))
    setup = next(c for c in nb.cells if "\nPRESET = " in c.source)
    stop = next(i for i, c in enumerate(nb.cells) if c.source.startswith("if not MORE_LESSONS"))
    args = {"07": "--warm-epochs 1 --epochs 1 --lr-grid 1e-2 --seeds 1 --methods fkl --own-samples 1",
            "08": "--prompts 2 --new-tokens 12 --draft-tokens 2 --repeats 1",
            "09": "--seeds 1 --epochs 1 --starts pruned",
            "10": "--seeds 1 --epochs 1 --byte-epochs 1 --methods tokens,projected"}
    rest, lesson = [], None
    for c in nb.cells[stop + 1:]:
        lesson = c.source[len("## Lesson "):][:2] if c.source.startswith("## Lesson ") else lesson
        if c.source.startswith('ARGS = ""'):
            c.source = c.source.replace('ARGS = ""', f'ARGS = "{args[lesson]}"')
        rest.append(c)
    stopped = nbformat.v4.new_notebook(cells=[magic, setup, nb.cells[stop]])
    stopped = as_a_learner_sets_it(stopped, more=True)
    stopped.cells[1].source = stopped.cells[1].source.replace("MORE_LESSONS = True", "MORE_LESSONS = False")
    run_notebook(stopped, {}, folder=tmp_path, allow_errors=True)
    error, = [o for o in stopped.cells[-1].outputs if o.output_type == "error"]
    said, = error.traceback  # one line
    assert said.startswith("error: lessons 07-10 are not run by Run all"), said
    nb.cells = [magic, setup, *rest]
    run_notebook(as_a_learner_sets_it(nb, more=True), {"TIKTOKEN_CACHE_DIR": str(out.parent / "tiktoken")},
                 folder=tmp_path)
    art = tmp_path / "artifacts"
    assert (art / "methods.md").exists() and (art / "speculative.md").exists() and (art / "starts.md").exists()
    assert "| fkl |" in (art / "methods.md").read_text() and "| soft |" not in (art / "methods.md").read_text()
    assert "| pruned |" in (art / "starts.md").read_text() and "| random |" not in (art / "starts.md").read_text()
    assert "07: fkl" in (art / "speculative.md").read_text()  # 08 took 07's students as drafts
    assert "| byte student: projected |" in (art / "bytes.md").read_text()
    assert "| byte student: seq |" not in (art / "bytes.md").read_text()


def test_every_step_heading_has_its_code_under_it():
    """Each "####" heading of a lesson's functions or steps is followed by its code: none left over
    at a section's end (the sentinel ruler that closes the last step has no code of its own)."""
    nb = json.load(open(os.path.join(ROOT, "course.ipynb"), encoding="utf-8"))
    cells = nb["cells"]
    for i, c in enumerate(cells):
        text = "".join(c["source"])
        if c["cell_type"] == "markdown" and text.startswith("#### "):
            assert i + 1 < len(cells) and cells[i + 1]["cell_type"] == "code", (i, text[:60])
