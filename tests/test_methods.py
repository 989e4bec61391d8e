"""Lesson 07, the divergence lab, end to end on the tiny course (cut to a few steps)."""
import matplotlib.image

from common.artifacts import load_artifact
from conftest import load_lesson, run_py
from test_train import keep_train_samples

LAB = load_lesson("07_methods.py")


def test_the_lab_trains_and_measures_every_method_and_a_second_run_keeps_them(course_copy):
    keep_train_samples(course_copy, 16, n_val=4, n_test=6)  # 4 steps an epoch, 6 samples to measure on
    flags = ["07_methods.py", "--preset", "tiny", "--out", str(course_copy), "--warm-epochs", "1", "--epochs", "1",
             "--own-samples", "1"]
    r = run_py(flags)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md = (course_copy / "methods.md").read_text()
    for name in ["teacher (reference)", "start (1 epochs of seq)", *LAB.METHODS]:
        assert f"| {name} | " in md
    for k in LAB.TOPK:
        assert f"| {k} | {6 * k} | " in md
    res = load_artifact(str(course_copy / "methods.pt"), "methods")
    assert set(res["steps"]) == set(LAB.METHODS) and set(res["steps"].values()) == {4}
    for name in LAB.METHODS:  # each method's own run, in its own folder, from the same start
        log = load_artifact(str(course_copy / "methods" / name.replace(" ", "_") / "train_log.pt"), "train_log")
        assert log["settings"]["init"].endswith("methods/start/student_last.pt")
        assert log["val"][-1][1] < log["val"][0][1]  # it learned something, whatever the divergence
        assert res["rows"][name]["fkl"] > 0 and res["rows"][name]["rkl"] > 0
    assert res["rows"]["teacher"]["fkl"] == 0
    price = res["price"]
    assert all(price["rest"][k] <= price["exact"] + 1e-4 for k in LAB.TOPK)  # merging tokens hides differences
    assert (course_copy / "methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w, _ = matplotlib.image.imread(course_copy / "methods.png").shape
    assert h > 300 and w > 600
    again = run_py(flags[:-6] + ["--warm-epochs", "1", "--epochs", "1", "--own-samples", "1", "--methods", "seq,rkl"])
    assert again.returncode == 0, again.stderr
    assert "=== start: trained earlier" in again.stdout and "=== rkl: trained earlier" in again.stdout
    assert "04_train.py" not in again.stdout


def test_the_lab_refuses_an_unknown_method_in_one_line(course_copy):
    r = run_py(["07_methods.py", "--preset", "tiny", "--out", str(course_copy), "--methods", "seq,kl"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "unknown method kl" in r.stderr
