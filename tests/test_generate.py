"""Lesson 02's quality filter: loops and duplicates are dropped and counted."""
import shutil

from common.artifacts import load_artifact
from conftest import load_lesson, run_py


def test_repeated_ngram_fraction():
    lesson = load_lesson("02_generate.py")
    assert lesson.repeated_ngram_fraction(list(range(40))) == 0.0
    assert lesson.repeated_ngram_fraction([1, 2, 3] * 20) > 0.9      # a loop
    assert lesson.repeated_ngram_fraction([5, 6]) == 0.0              # too short to judge


def test_greedy_duplicates_are_dropped_and_reported(course, tmp_path):
    shutil.copy(course[0] / "teacher.pt", tmp_path / "teacher.pt")
    # greedy decoding writes the same text for the same prompt: the 6 unconditional samples are one text
    # (greedy text loops, so --max-repeat 0.95 keeps loops and leaves the duplicates to be caught)
    r = run_py(["02_generate.py", "--preset", "tiny", "--out", str(tmp_path), "--temperature", "0",
                "--num-samples", "12", "--prompts", "mixed", "--max-repeat", "0.95"])
    assert r.returncode == 0, r.stderr
    gen = load_artifact(str(tmp_path / "generated.pt"), "generated")
    kept = [tuple(t.tolist()) for t in gen["train"] + gen["val"] + gen["test"]]
    assert len(set(kept)) == len(kept)
    assert gen["dropped"]["duplicate"] == 5  # the 6 unconditional samples are one text
    assert f"kept {len(kept)} of 12" in r.stdout and len(kept) + sum(gen["dropped"].values()) == 12
