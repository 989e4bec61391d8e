"""The house rules a linter does not check: the ideas (common/) a layer of their own that imports
nothing of the plumbing (common/plumbing/); no lesson function with more than 6 parameters (objects
that belong together travel together); the parts a reader expects in every lesson; each idea
written once. ruff checks the 100-character lines (.ci/run); a reader, not a line count, judges a
function's length."""
import ast
import glob
import os
import re

import pytest

from conftest import ROOT

LESSONS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "[0-9][0-9]_*.py")))
IDEAS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "common", "*.py")))


def parse(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        source = f.read()
    return source, ast.parse(source)


def imported(tree):
    """Every module a file imports, at the top or inside a function."""
    names = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            names += [a.name for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.module:
            names += [n.module] + [f"{n.module}.{a.name}" for a in n.names]
    return names


@pytest.mark.parametrize("path", IDEAS)
def test_the_ideas_import_nothing_of_the_plumbing(path):
    """common/ is the course's ideas (the model, sampling, the losses, perplexity...): a reader
    takes any of them alone. The plumbing (saving files, flags, devices) may use the ideas, never the
    reverse."""
    _, tree = parse(path)
    assert not [m for m in imported(tree) if m.startswith("common.plumbing")], path


@pytest.mark.parametrize("path", LESSONS)
def test_no_lesson_function_takes_more_than_6_parameters(path):
    _, tree = parse(path)
    many = [(n.name, len(n.args.args) + len(n.args.kwonlyargs)) for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and len(n.args.args) + len(n.args.kwonlyargs) > 6]
    assert not many, many


def test_every_lesson_has_the_parts_a_reader_expects():
    """A docstring that says what it reads and writes and how to run it, settings at the top (before
    the first function), and a main() run through run_lesson."""
    for path in LESSONS:
        source, tree = parse(path)
        doc = ast.get_docstring(tree)
        assert doc and doc.startswith(f"Lesson {path[:2]}:"), path
        assert "Reads:" in doc and "Writes:" in doc and "Run:" in doc, path
        assert re.search(r'if __name__ == "__main__":\n    run_lesson\(main(, oom="[^"]+")?\)$', source.rstrip()), path
        functions = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert functions[-1] == "main", (path, "after main:", functions[functions.index("main") + 1:])


def test_each_idea_is_written_once():
    """The acceptance sum min(p, q) lives in common/speculative.py, the held-out scoring loop in
    common/perplexity.py (score_sampled), the padded batches in common/distill.py (batches), the
    chart saving in common/plumbing/charts.py: a lesson or a bench calls them, never writes them
    again."""
    for path in LESSONS + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "bench", "*.py"))):
        source, tree = parse(path)
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert not defined & {"batches", "acceptance", "show_and_save", "save_chart"}, path
        assert "torch.minimum(" not in source, f"{path}: sum min(p, q) is speculative.acceptance"
        assert "fig.savefig(" not in source, f"{path}: charts are saved by charts.save_chart"
        assert not re.search(r"for i in range\(0, len\(seqs\), batch_size\)", source), \
            f"{path}: held-out batches come from distill.batches / perplexity.score_sampled"
