"""The lessons stay readable (nanoGPT's train.py as the yardstick): short functions, a training loop
that fits on one screen, no long closures in 04's main(), lines of at most 100 characters. ruff
checks the lines too (.ci/run); this keeps the shape of the code, which no linter measures."""
import ast
import glob
import os
import re

import pytest

from conftest import ROOT

LESSONS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "0[0-9]_*.py")))
MODULES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "common", "**", "*.py"),
                                                            recursive=True))


def parse(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        source = f.read()
    return source, ast.parse(source)


def length(node):
    return node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("path", LESSONS + MODULES + ["make_notebook.py"])
def test_no_function_is_over_100_lines_and_no_line_over_100_characters(path):
    source, tree = parse(path)
    long_functions = [(n.name, length(n)) for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and length(n) > 100]
    assert not long_functions
    long_lines = [i for i, line in enumerate(source.splitlines(), 1) if len(line) > 100]
    assert not long_lines, f"{path}: lines {long_lines} are over 100 characters"


def main_of(path):
    _, tree = parse(path)
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")


def test_lesson_04_loop_fits_on_a_screen_and_main_has_no_long_closures():
    main = main_of("04_train.py")
    loops = [n for n in ast.walk(main) if isinstance(n, ast.While)]
    assert len(loops) == 1 and length(loops[0]) <= 45, [length(n) for n in loops]
    closures = [n for n in ast.walk(main) if n is not main
                and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
    assert all(length(n) <= 5 for n in closures), [length(n) for n in closures]


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
