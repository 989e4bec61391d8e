"""Lesson 09, three starts for one student: on the tiny course cut to a few steps, each start made by
03 and trained by 04 alike, and every number of the table recomputed here for one run."""
import math
import re
import sys

import pytest
import torch
from torch.nn import functional as F

from common import toy_language
from common.perplexity import sequences_perplexity
from common.plumbing.artifacts import load_artifact, load_model
from common.plumbing.errors import LessonError
from common.plumbing.runs import run_or_refuse, run_script
from common.tokenizer import EOT, get_tokenizer
from conftest import load_lesson, run_here
from test_train import keep_train_samples


@pytest.mark.slow
def test_three_starts_made_by_03_trained_by_04_and_measured_before_and_after(start_copy,
                                                                              runs_in_process,
                                                                              monkeypatch, capsys):
    keep_train_samples(start_copy, 8, n_val=4, n_test=6)  # 2 steps an epoch, 6 samples to measure
    flags = ["09_starts.py", "--preset", "tiny", "--out", str(start_copy), "--seeds", "2",
             "--epochs", "1"]
    r = run_here(flags)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = load_artifact(str(start_copy / "starts.pt"), "starts")
    gen = load_artifact(str(start_copy / "generated.pt"), "generated")
    test, P = gen["test"], gen["test_prompt_lens"]
    teacher, _ = load_model(str(start_copy / "teacher.pt"), "teacher")
    shapes = {"random": (1, 32, 2), "every other block": (1, 64, 4), "pruned": (1, 32, 2)}
    for name, shape in shapes.items():
        ppl = []
        for seed in (1337, 1338):
            sub = start_copy / "starts" / name.replace(" ", "_") / f"seed{seed}"
            init, ckpt = load_model(str(sub / "student_init.pt"), "student_init")
            c = init.config
            assert (c.n_layer, c.n_embd, c.n_head) == shape and ckpt["seed"] == seed
            assert ckpt["from_teacher"] == (name == "every other block")
            assert ckpt["pruned"] == (name == "pruned")
            log = load_artifact(str(sub / "train_log.pt"), "train_log")
            assert log["settings"]["seed"] == seed and log["step"][-1] == 2
            assert log["settings"]["init"] is None  # 04 read the student_init.pt 03 wrote
            ppl.append(sequences_perplexity(init, test, 8, P))
            # its printed line: this seed, this start's parameters, its perplexity before training
            said = re.search(re.escape(f"  {name:<18} seed {seed} | {init.num_params() / 1e6:.2f}M | ppl ")
                             + r"([\d,.]+) ->", r.stdout)
            assert said and float(said.group(1).replace(",", "")) == pytest.approx(ppl[-1], rel=1e-5, abs=0.006), name
        before = res["rows"][name]["before"]["ppl"]
        assert before[0] == pytest.approx(sum(ppl) / 2, rel=1e-4)
        assert (before[1], before[2]) == pytest.approx((min(ppl), max(ppl)), rel=1e-4)
    # the pruned start's acceptance after training, sum min(p, q) over the test positions, here
    acc = []
    for seed in (1337, 1338):
        student, _ = load_model(str(start_copy / f"starts/pruned/seed{seed}/student.pt"), "student")
        total, n = 0.0, 0
        for s, p_len in zip(test, P):
            with torch.no_grad():
                p = F.softmax(teacher(s[None, :-1])[0][0].double(), -1)[p_len - 1:]
                q = F.softmax(student(s[None, :-1])[0][0].double(), -1)[p_len - 1:]
            total += torch.minimum(p, q).sum().item()
            n += len(s) - p_len
        acc.append(total / n)
    assert res["rows"]["pruned"]["after"]["acceptance"] == pytest.approx(
        (sum(acc) / 2, min(acc), max(acc)), rel=1e-4)
    assert res["teacher"]["acceptance"] == pytest.approx(1, abs=1e-4)
    # the toy language's floor on lesson 05's held-out documents, recomputed here
    L05 = load_lesson("05_evaluate.py")
    docs = toy_language.documents(L05.TOY_DOCUMENTS, L05.TOY_SEED)
    floor = math.exp(toy_language.entropy_per_token(docs, get_tokenizer().encode))
    assert res["floor"] == pytest.approx(floor, rel=1e-9)
    # the teacher's toy-language perplexity, each document read from <|endoftext|> to its closing one
    toy = [torch.tensor([EOT] + get_tokenizer().encode(d) + [EOT]) for d in docs]
    assert res["teacher"]["toy_ppl"] == pytest.approx(sequences_perplexity(teacher, toy, 8, [1] * len(toy)), rel=1e-4)
    assert f"\nmeasuring on generated-test ({len(test)} samples) and {len(docs)} toy-language documents (floor {floor:.2f})\n" in r.stdout
    md = (start_copy / "starts.md").read_text()
    # every cell of starts.md is its row in starts.pt, mean (min–max) over the 2 seeds
    assert (f"`04_train.py --preset tiny` with the same recipe (2 optimizer steps), seeds 1337–1338 "
            f"(03's init and 04's data order); each cell the mean over seeds (min–max). Measured on the "
            f"teacher's {len(test)} held-out test samples (sampled tokens only) and {len(docs)} held-out "
            f"toy-language documents (floor: the language's own perplexity, {floor:.2f}).") in md
    t = res["teacher"]
    assert f"| teacher | {t['params'] / 1e6:.2f}M | {t['ppl']:.2f} | | {t['toy_ppl']:.2f} | | 1 | |\n" in md
    for name in shapes:
        row = res["rows"][name]
        cells = [f"{row['before']['params'][0] / 1e6:.2f}M"]
        for key, fmt in (("ppl", "{:,.2f}"), ("toy_ppl", "{:,.2f}"), ("acceptance", "{:.3f}")):
            for when in ("before", "after"):
                mean, lo, hi = row[when][key]
                f = fmt if when == "before" else fmt.replace(",", "")
                cells.append(f"{f.format(mean)} ({f.format(lo)}–{f.format(hi)})")
        assert f"| {name} | " + " | ".join(cells) + " |\n" in md, name
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + 1 + len(shapes) and "\n".join(table) + "\n" in r.stdout  # printed as written
    # each seed's printed line after training: its student.pt measured here again
    for name in shapes:
        after = []
        for seed in (1337, 1338):
            student, _ = load_model(str(start_copy / "starts" / name.replace(" ", "_") / f"seed{seed}"
                                        / "student.pt"), "student")
            after.append((sequences_perplexity(student, test, 8, P),
                          sequences_perplexity(student, toy, 8, [1] * len(toy))))
            said = re.search(re.escape(f"  {name:<18} seed {seed} | ") + r".* -> ([\d.]+) \| acceptance "
                             r"[\d.]+ -> [\d.]+ \| toy ppl [\d,.]+ -> ([\d.]+)\n", r.stdout)
            assert said and [float(v) for v in said.groups()] == pytest.approx(after[-1], rel=1e-4, abs=0.006)
        for k, key in enumerate(("ppl", "toy_ppl")):
            v = [a[k] for a in after]
            assert res["rows"][name]["after"][key] == pytest.approx((sum(v) / 2, min(v), max(v)), rel=1e-4)
    assert (start_copy / "starts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # asked again, each run is kept, not trained again (09's training step, without the measuring)
    L09 = load_lesson("09_starts.py")
    monkeypatch.setattr(sys, "argv", flags)
    args = L09.get_args()
    capsys.readouterr()
    for name in shapes:
        for seed in (1337, 1338):
            L09.run_start(args, name, seed)
    assert capsys.readouterr().out.count("trained earlier with the same settings") == 6
    # one run that took 3 steps where the others took 2 (another recipe): the comparison is refused
    from common.plumbing import runs
    real_train = runs.train

    def one_longer(label, sub, *a):
        log = real_train(label, sub, *a)
        return {**log, "step": log["step"] + [3]} if sub.endswith("pruned/seed1338") else log
    monkeypatch.setattr(runs, "train", one_longer)
    r = run_here(flags)
    assert r.returncode == 1 and "the runs trained for different numbers of steps ([2, 3])" in r.stderr, r.stderr


def test_starts_refuses_a_depth_the_teacher_lacks_in_one_line(start_copy):
    r = run_here(["09_starts.py", "--preset", "tiny", "--out", str(start_copy), "--n-layer", "3"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "only 2 blocks" in r.stderr
    assert not (start_copy / "starts").exists()


def test_a_run_is_a_command_and_its_failure_one_line(tmp_path, capsys):
    """runs.py's subprocess, for real (the tests above run it in process): its output passed on,
    its exit code kept, a failure's own error line in the one line that says which run failed."""
    code, lines = run_script("03_student.py", ["--help"])
    assert code == 0 and lines[0].startswith("usage: 03_student.py")
    assert "usage: 03_student.py" in capsys.readouterr().out
    with pytest.raises(LessonError) as e:
        run_or_refuse("04_train.py", ["--preset", "tiny", "--out", str(tmp_path)], "seq, seed 1")
    assert "04_train.py failed for seq, seed 1 (error: " in str(e.value)
    assert "run 02_generate.py first" in str(e.value)  # 04's own line, passed on


def test_starts_refuses_an_unknown_start_in_one_line(start_copy):
    r = run_here(["09_starts.py", "--preset", "tiny", "--out", str(start_copy), "--starts", "random,distilled"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "unknown start distilled" in r.stderr
    assert not (start_copy / "starts").exists()
