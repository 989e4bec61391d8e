"""The whole course: run_all.sh on the tiny preset, and every lesson run as a notebook cell."""
import os
import re

import pytest
import torch

from common.artifacts import load_artifact
from common.tokenizer import EOT, get_tokenizer
from conftest import ROOT, run_py

LESSONS = ["01_teacher.py", "02_generate.py", "03_student.py", "04_train.py", "05_evaluate.py", "06_compare.py"]
CHAIN = [("teacher.pt", "teacher"), ("generated.pt", "generated"), ("student_init.pt", "student_init"),
         ("student.pt", "student"), ("train_log.pt", "train_log"), ("eval.pt", "eval")]


def test_run_all_tiny_builds_the_whole_chain(course):
    out, stdout = course
    for file, kind in CHAIN:
        assert load_artifact(str(out / file), kind)["kind"] == kind
    assert (out / "report.md").exists()
    assert re.search(r"course finished in \d+s", stdout)
    ev = load_artifact(str(out / "eval.pt"), "eval")
    ppl = ev["perplexity"]["generated-test"]
    assert ppl["student"] < ppl["student_init"] / 5  # the student learned from the teacher's text
    assert ppl["teacher"] < ppl["student"]
    assert "wikitext2" not in ev["perplexity"] and "wikitext2" in ev["skipped"]  # skipped, not NaN
    assert ev["agreement"]["student"] > ev["agreement"]["student_init"]
    assert ev["kl"]["student"] < ev["kl"]["student_init"]
    gen = load_artifact(str(out / "generated.pt"), "generated")
    for split in ("train", "val", "test"):
        assert len(gen[split]) == len(gen[f"{split}_texts"]) == len(gen[f"{split}_prompt_lens"]) >= 1
        for seq, ids, lps in zip(gen[split], gen[f"{split}_topk_ids"], gen[f"{split}_topk_logprobs"]):
            assert ids.shape == lps.shape == (len(seq) - 1, 32) and seq[0] == 50256
            assert str(ids.dtype) == "torch.int32" and str(lps.dtype) == "torch.float16"


def test_the_teachers_top_k_rows_line_up_with_its_tokens(course):
    """Row t of a sample's top-K table is the teacher's distribution after token t. Then, on the test
    positions, the teacher's top-1 is always its own stored top-1, and its KL to its own top-K is only
    the truncation: -log(the mass of the K tokens), averaged over the sampled positions."""
    out, _ = course
    ev = load_artifact(str(out / "eval.pt"), "eval")
    gen = load_artifact(str(out / "generated.pt"), "generated")
    assert ev["agreement"]["teacher"] == 1.0
    cost = [-torch.logsumexp(lps[P - 1:].float(), -1) for lps, P in zip(gen["test_topk_logprobs"], gen["test_prompt_lens"])]
    cost = torch.cat(cost)
    assert ev["kl"]["teacher"] == pytest.approx(cost.mean().item(), rel=2e-3)
    assert cost.mean().item() > 0.01  # the K tokens do not hold all the mass: a real, visible cost


def test_no_opening_is_in_two_splits_and_only_sampled_tokens_are_trained(course):
    out, _ = course
    gen = load_artifact(str(out / "generated.pt"), "generated")
    enc = get_tokenizer()
    openings = {}
    for split in ("train", "val", "test"):  # read the openings back from the tokens themselves
        openings[split] = {enc.decode(s[1:P].tolist()) for s, P in zip(gen[split], gen[f"{split}_prompt_lens"]) if P > 1}
        assert all(s[0] == EOT for s in gen[split])
    assert openings["val"] and openings["test"]
    assert not openings["train"] & openings["val"] and not openings["train"] & openings["test"]
    assert not openings["val"] & openings["test"]
    assert any(P == 1 for P in gen["test_prompt_lens"])  # unconditional samples are held out too
    log = load_artifact(str(out / "train_log.pt"), "train_log")
    sampled = sum(len(s) - P for s, P in zip(gen["train"], gen["train_prompt_lens"]))
    assert log["tokens"] == sampled * log["settings"]["epochs"]


def test_the_tied_embedding_is_saved_once(course):
    out, _ = course
    for name in ("teacher", "student"):
        params = sum(v.numel() for k, v in load_artifact(str(out / f"{name}.pt"), name)["model"].items()
                     if k != "lm_head.weight")  # lm_head.weight is the token embedding itself
        assert os.path.getsize(out / f"{name}.pt") == pytest.approx(4 * params, rel=0.01)


def test_report_numbers_are_the_ones_in_eval_pt_and_the_charts_are_images(course):
    out, _ = course
    ev = load_artifact(str(out / "eval.pt"), "eval")
    report = (out / "report.md").read_text()
    for set_name, r in ev["perplexity"].items():
        improvement = (r["student_init"] - r["student"]) / r["student_init"]
        row = (f"| {set_name} | {r['teacher']:,.2f} | {r['student_init']:,.2f} | {r['student']:,.2f} | "
               f"{improvement:.1%} | {r['teacher'] / r['student']:.1%} |")
        assert row in report
    assert "![perplexity](perplexity.png)" in report and "- teacher:" in report and "- student:" in report
    import matplotlib.image
    for png in ("perplexity.png", "training.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        h, w, _ = matplotlib.image.imread(out / png).shape
        assert h > 300 and w > 400


NOTEBOOK = """
import os, sys
sys.argv = ["/usr/lib/python3/dist-packages/ipykernel_launcher.py", "-f",
            "/root/.local/share/jupyter/runtime/kernel-4f2a9c1e.json"]

def cell(lesson):  # what pasting a lesson into a cell and running it does: same process, kernel's argv
    source = open(lesson).read()
    try:
        exec(compile(source, "<cell>", "exec"), {{"__name__": "__main__"}})
    except SystemExit as e:
        raise AssertionError(f"{{lesson}} exited with {{e.code}}")
    print(f"=== cell {{lesson}} done", flush=True)

os.environ["KD_PRESET"] = "tiny"          # %env KD_PRESET=tiny
for lesson in {lessons!r}:
    cell(lesson)
del os.environ["KD_PRESET"]               # back to the default preset, gpt2, in the same kernel
os.environ["KD_WIKITEXT_URL"] = "http://127.0.0.1:9/none.zip"
for lesson in {lessons!r}[4:]:
    cell(lesson)
"""


def test_the_lessons_run_as_notebook_cells_in_one_kernel(tmp_path):
    """As pasted into Colab, one cell after another in one process: the kernel's argv, no __file__,
    the preset chosen with %env, and a change of KD_PRESET between cells taking effect at once."""
    r = run_py(["-c", NOTEBOOK.format(lessons=LESSONS)], env={"KD_OUT": str(tmp_path), "KD_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert r.stdout.count("=== cell") == len(LESSONS) + 2 and (tmp_path / "report.md").exists()
    first, again = r.stdout.split("=== cell 06_compare.py done", 1)
    assert "training the tiny teacher" in first
    # 05 and 06 again with the plain defaults (the gpt2 preset), offline, on the artifacts already there:
    # the gpt2 preset tries WikiText-2 and, offline, says so and goes on
    assert "skipped wikitext2: could not download it" in again


def test_make_notebook_holds_every_lesson_unchanged(tmp_path):
    import json
    r = run_py(["make_notebook.py", str(tmp_path / "course.ipynb")])
    assert r.returncode == 0, r.stderr
    nb = json.loads((tmp_path / "course.ipynb").read_text())
    assert nb["nbformat"] == 4
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert code[1:] == [open(f"{ROOT}/{lesson}", encoding="utf-8").read() for lesson in LESSONS]
    markdown = [c for c in nb["cells"] if c["cell_type"] == "markdown"]
    assert len(markdown) == 1 + len(LESSONS) and markdown[1]["source"][0].startswith("## Lesson 01")
