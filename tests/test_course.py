"""The whole course: course.ipynb executed in a headless kernel on the tiny preset, the artifacts it
leaves, a preset changed between cells, and run_all.sh's loop. (The notebook's own make-up:
test_notebook.py.)"""
import os
import re
import stat
import subprocess
import zipfile

import pytest
import torch

from common.model import logits_fp32
from common.plumbing.artifacts import load_artifact, load_model
from common.tokenizer import EOT, get_tokenizer
from conftest import ROOT, cell_text, first_cell_of, run_notebook

LESSONS = ["01_teacher.py", "02_generate.py", "03_student.py", "04_train.py", "05_evaluate.py", "06_compare.py"]
CHAIN = [("teacher.pt", "teacher"), ("generated.pt", "generated"), ("student_init.pt", "student_init"),
         ("student.pt", "student"), ("train_log.pt", "train_log"), ("eval.pt", "eval")]


def common_files(folder):
    """The .py files under folder/common, as paths relative to folder."""
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(os.path.join(folder, "common"))
                  for f in fs if f.endswith(".py"))


def test_the_notebook_alone_runs_every_cell_shows_its_charts_and_builds_the_whole_chain(course):
    """course.ipynb uploaded alone (an empty folder, no network): it writes common/ itself, takes the
    tokenizer's ranks from tiktoken, and runs the whole tiny course, then packs what it made."""
    out, stdout, nb = course
    code = [c for c in nb.cells if c.cell_type == "code"]
    # every module (and __init__.py) but the one lesson 08's section writes, after "Run all" stops
    assert common_files(out.parent) == [f for f in common_files(ROOT) if f != "common/speculative.py"]
    assert all(c.execution_count for c in code) and not any(o.output_type == "error" for c in code for o in c.outputs)
    setup = next(cell_text(c) for c in code if "\nPRESET = " in c.source)  # where it will train, how
    assert "preset: tiny" in setup and "device: cpu | trains in fp32" in setup, setup
    lesson_06 = nb.cells[first_cell_of(nb, "06"):]
    images = [o for c in lesson_06 if c.cell_type == "code" for o in c.outputs
              if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 3  # 06's three charts, shown under its cells
    for file, kind in CHAIN:
        assert load_artifact(str(out / file), kind)["kind"] == kind
    assert (out / "report.md").exists() and (out / "soft_targets.png").exists()
    with zipfile.ZipFile(out.parent / "course_results.zip") as z:  # to download, before a recycle
        packed = set(z.namelist())
    assert {"student.pt", "report.md", "eval.pt", "training.png"} <= packed
    assert not packed & {"teacher.pt", "train_state.pt", "student_last.pt"}
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


def test_a_preset_changed_between_cells_takes_effect_at_once(course_copy):
    """In one kernel: with %env KD_PRESET=gpt2, lesson 03 on the tiny teacher is refused in one line
    that says what to run in a notebook, and nothing changes; after %env KD_PRESET=tiny, the same cell
    builds the tiny student."""
    import nbformat
    before = (course_copy / "student_init.pt").read_bytes()
    source = open(os.path.join(ROOT, "03_student.py"), encoding="utf-8").read()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in (
        "%env KD_PRESET=gpt2", source, "%env KD_PRESET=tiny", source)])
    run_notebook(nb, {"KD_OUT": str(course_copy)}, allow_errors=True)
    refused, built = nb.cells[1], nb.cells[3]
    errors = [line for line in cell_text(refused).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "run %env KD_PRESET=tiny in a cell" in errors[0], cell_text(refused)
    error, = [o for o in refused.outputs if o.output_type == "error"]  # "run all" stops here
    assert error.ename == "SystemExit" and len(error.traceback) <= 2  # and no chain of tracebacks
    assert (course_copy / "student_init.pt").read_bytes() == before
    assert not any(o.output_type == "error" for o in built.outputs), cell_text(built)
    assert "wrote" in cell_text(built) and (course_copy / "student_init.pt").read_bytes() == before  # same seed


def test_run_all_runs_the_lessons_in_order_passing_preset_and_out_and_stops_at_a_failure(tmp_path):
    """run_all.sh's own logic, with a stand-in for python that records its calls (the lessons
    themselves run in the notebook test above and in the tests of each lesson)."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n[ "$1" != "$FAIL_AT" ]\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PYTHON=str(fake), FAIL_AT="none")
    r = subprocess.run(["bash", "run_all.sh", "--preset", "tiny", "--out", "somewhere"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "course finished in" in r.stdout, r.stderr
    assert calls.read_text().splitlines() == [f"{lesson} --preset tiny --out somewhere" for lesson in LESSONS]
    calls.unlink()
    r = subprocess.run(["bash", "run_all.sh"], cwd=ROOT, env=dict(env, FAIL_AT="03_student.py"),
                       capture_output=True, text=True)
    assert r.returncode == 1 and "03_student.py failed" in r.stderr and "course finished" not in r.stdout
    assert calls.read_text().splitlines() == LESSONS[:3]


def test_the_teachers_top_k_rows_line_up_with_its_tokens(course):
    """Row t of a sample's top-K table is the teacher's distribution after token t. Then, on the test
    positions, the teacher's top-1 is always its own stored top-1, and its KL to its own top-K is only
    the truncation, -log(the mass of the K tokens), plus the stored log-probs' float16 rounding:
    recomputed here from the teacher's float32 log-probs at the stored ids."""
    out, _, _ = course
    ev = load_artifact(str(out / "eval.pt"), "eval")
    gen = load_artifact(str(out / "generated.pt"), "generated")
    teacher, _ = load_model(str(out / "teacher.pt"), "teacher")
    assert ev["agreement"]["teacher"] == 1.0
    kl, cost = [], []
    for seq, ids, lps, P in zip(gen["test"], gen["test_topk_ids"], gen["test_topk_logprobs"],
                                gen["test_prompt_lens"]):
        with torch.no_grad():
            log_q = torch.log_softmax(logits_fp32(teacher, seq[None, :-1])[0], -1)  # (L, V)
        lps, log_q = lps[P - 1:].double(), log_q[P - 1:].gather(-1, ids[P - 1:].long()).double()
        log_p = lps - torch.logsumexp(lps, -1, keepdim=True)  # the stored top-K, renormalised
        kl.append((log_p.exp() * (log_p - log_q)).sum(-1))
        cost.append(-torch.logsumexp(lps, -1))
    kl, cost = torch.cat(kl), torch.cat(cost)
    assert ev["kl"]["teacher"] == pytest.approx(kl.mean().item(), rel=1e-4)
    assert kl.mean().item() == pytest.approx(cost.mean().item(), rel=1e-2)  # mostly the truncation
    # the K tokens do not hold all the mass: a real, visible cost (0.0098 or 0.0106 nats, by the
    # thread count the tiny course was trained with)
    assert cost.mean().item() > 0.005


def test_no_opening_is_in_two_splits_and_only_sampled_tokens_are_trained(course):
    out, _, _ = course
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
    out, _, _ = course
    for name in ("teacher", "student"):
        params = sum(v.numel() for k, v in load_artifact(str(out / f"{name}.pt"), name)["model"].items()
                     if k != "lm_head.weight")  # lm_head.weight is the token embedding itself
        assert os.path.getsize(out / f"{name}.pt") == pytest.approx(4 * params, rel=0.01)


def test_report_numbers_are_the_ones_in_eval_pt_and_the_charts_are_images(course):
    out, _, _ = course
    ev = load_artifact(str(out / "eval.pt"), "eval")
    report = (out / "report.md").read_text()
    for set_name, r in ev["perplexity"].items():
        improvement = (r["student_init"] - r["student"]) / r["student_init"]
        row = (f"| {set_name} | {r['teacher']:,.2f} | {r['student_init']:,.2f} | {r['student']:,.2f} | "
               f"{improvement:.1%} | {r['teacher'] / r['student']:.1%} |")
        assert row in report
    assert "![perplexity](perplexity.png)" in report and "- teacher:" in report and "- student:" in report
    import matplotlib.image
    for png in ("perplexity.png", "training.png", "soft_targets.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        h, w, _ = matplotlib.image.imread(out / png).shape
        assert h > 300 and w > 400


@pytest.mark.parametrize("lesson", LESSONS + ["07_methods.py", "08_speculative.py", "09_starts.py", "10_bytes.py"])
def test_help_says_what_the_lesson_does_in_whole_sentences_and_every_default(lesson, monkeypatch):
    """--help: the docstring's first whole sentences (never cut at a line end), and every flag's
    default, said by argparse or, for preset-dependent ones, in the help text itself; none said for a
    switch or a flag without one ("(default: False)", "(default: None)")."""
    import argparse
    import runpy

    import common.plumbing.cli

    class Caught(Exception):
        pass

    def catch(parser, presets=None):
        raise Caught(parser, presets)
    monkeypatch.setattr(common.plumbing.cli, "parse", catch)
    with pytest.raises(Caught) as e:
        runpy.run_path(os.path.join(ROOT, lesson), run_name="__main__")
    parser, presets = e.value.args
    assert parser.description.startswith(f"Lesson {lesson[:2]}: ") and parser.description[-1] in ".?"
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action) if action.help else ""
        if action.default is None and presets and action.dest in presets["tiny"]:
            assert "gpt2:" in text and "tiny:" in text, (action.dest, text)  # the preset's values
        elif action.default is not None and action.default is not False:
            assert "default" in text, (action.dest, text)
        else:  # a switch (off unless given) or a flag with no value unless given: argparse adds nothing
            assert "(default: None)" not in text and "(default: False)" not in text, (action.dest, text)


def test_the_report_gives_the_teachers_level_on_the_val_samples(course):
    """The teacher's cross-entropy on the val samples, as drawn on the training chart and written in
    report.md, computed here token by token (prompt targets left out)."""
    from common.plumbing.artifacts import load_model
    out, _, _ = course
    teacher, _ = load_model(str(out / "teacher.pt"), "teacher")
    gen = load_artifact(str(out / "generated.pt"), "generated")
    total, count = 0.0, 0
    with torch.no_grad():
        for seq, P in zip(gen["val"], gen["val_prompt_lens"]):
            log_probs = torch.log_softmax(teacher(seq[None, :-1])[0][0].double(), -1)
            nll = -log_probs[torch.arange(len(seq) - 1), seq[1:]]
            total, count = total + nll[P - 1:].sum().item(), count + len(seq) - P
    said = re.search(r"same val samples \(sampled tokens only\): ([0-9.]+) nats", (out / "report.md").read_text())
    assert said and float(said.group(1)) == pytest.approx(total / count, abs=1e-4)


def test_the_report_gives_the_share_of_the_gap_to_the_teacher_closed(course):
    """gap closed = (log ppl before - log ppl after) / (log ppl before - log ppl teacher), by hand
    from eval.pt, for every set in report.md."""
    import math
    out, _, _ = course
    ppl = load_artifact(str(out / "eval.pt"), "eval")["perplexity"]
    report = (out / "report.md").read_text()
    for name, r in ppl.items():
        before, after, teacher = math.log(r["student_init"]), math.log(r["student"]), math.log(r["teacher"])
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} | "))
        assert row.rstrip(" |").split("| ")[-1] == f"{(before - after) / (before - teacher):.1%}", row


def test_the_soft_targets_table_is_the_teachers_softmax_at_that_position(course):
    """02's soft targets: the teacher's 10 likeliest next tokens after the context it names, with
    softmax(logits / T) at T = 1 and T = 2 over the whole vocabulary; 06's report carries them with
    the students' probabilities."""
    out, _, _ = course
    st = load_artifact(str(out / "generated.pt"), "generated")["soft_targets"]
    teacher, _ = load_model(str(out / "teacher.pt"), "teacher")
    with torch.no_grad():
        logits = logits_fp32(teacher, torch.tensor([st["context"]]))[0, -1].double()
    p1, p2 = torch.softmax(logits, -1), torch.softmax(logits / st["T"], -1)
    assert st["ids"] == p1.topk(10).indices.tolist() and st["T"] == 2
    # 02 takes the softmax in float32 over 50,257 logits: 4e-5 relative off float64's
    assert torch.allclose(torch.tensor(st["p_T1"]).double(), p1[st["ids"]], rtol=2e-4, atol=0)
    assert torch.allclose(torch.tensor(st["p_T"]).double(), p2[st["ids"]], rtol=2e-4, atol=0)
    report = (out / "report.md").read_text()
    assert "## Soft targets" in report and f"| {st['p_T1'][0]:.3f} | {st['p_T'][0]:.3f} |" in report
