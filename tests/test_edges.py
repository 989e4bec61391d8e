"""Every rule at its edge: the last value a rule accepts is accepted, the first it refuses is refused.

A rule is tested where it is written: a `<` that should be `<=` passes every test away from its
bound. A lesson's own checks are run up to the first thing the lesson does after them, which a spy
turns into `Passed` (the check let the value through) instead of running the lesson on.
"""
import argparse
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from conftest import load_lesson, run_here  # noqa: E402


class Passed(Exception):
    """Raised by a spy on the first call after a lesson's checks: they let the flags through."""


def stop_at(monkeypatch, module, name):
    def passed(*a, **k):
        raise Passed(name)
    monkeypatch.setattr(module, name, passed)


def checked(args, monkeypatch, module, name):
    """'passed' if the lesson's checks let `args` through, else its one-line refusal."""
    stop_at(monkeypatch, module, name)
    try:
        r = run_here(args)
    except Passed:
        return "passed"
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    return r.stderr.strip()


def test_each_number_type_takes_its_bounds_as_its_interval_says():
    """[0, 1] takes 0 and 1; (0, 1] refuses 0; [0, 1) refuses 1; a positive int starts at 1, a
    non-negative one at 0."""
    from common.plumbing import cli
    cases = {cli.unit_float: ([0, 1], [-1e-9, 1 + 1e-9]), cli.prob_float: ([1e-9, 1], [0, 1.0001]),
             cli.fraction: ([0, 0.999], [1, -1e-9]), cli.positive_float: ([1e-9], [0]),
             cli.nonneg_float: ([0], [-1e-9]), cli.positive_int: ([1], [0]), cli.nonneg_int: ([0], [-1])}
    for check, (good, bad) in cases.items():
        for x in good:
            assert check(str(x)) == x
        for x in bad:
            with pytest.raises(argparse.ArgumentTypeError):
                check(str(x))
    assert cli.positive_floats("1e-3, 2") == [1e-3, 2.0]


def test_a_file_flag_takes_a_file_and_refuses_a_folder_a_path_flag_takes_either(tmp_path):
    from common.plumbing import cli
    (tmp_path / "f.txt").write_text("x")
    assert cli.existing_file(str(tmp_path / "f.txt")) == str(tmp_path / "f.txt")
    assert cli.existing_path(str(tmp_path)) == str(tmp_path)
    assert cli.existing_path(str(tmp_path / "f.txt")) == str(tmp_path / "f.txt")
    for check, path, said in ((cli.existing_file, tmp_path, "is not a file"),
                              (cli.existing_file, tmp_path / "no", "is not a file"),
                              (cli.existing_path, tmp_path / "no", "does not exist")):
        with pytest.raises(argparse.ArgumentTypeError, match=said):
            check(str(path))


def test_02s_checks_at_their_edges(start_copy, monkeypatch):
    """--cache-draws 255 goes, 256 not; val + test fractions must leave training samples; a prompt
    plus --max-new-tokens may fill the teacher's context exactly, not one more."""
    import torch

    import common.model
    from common import toy_language
    from common.tokenizer import EOT, get_tokenizer
    enc = get_tokenizer()
    ckpt = torch.load(start_copy / "teacher.pt", weights_only=False)
    room = ckpt["config"]["block_size"] - max(len([EOT] + enc.encode(t)) for t in toy_language.OPENINGS)
    base = ["02_generate.py", "--preset", "tiny", "--out", str(start_copy), "--prompts", "topics",
            "--num-samples", str(len(toy_language.OPENINGS)), "--max-new-tokens", "8"]

    def run(*flags):
        return checked(base + list(flags), monkeypatch, common.model, "logits_fp32")
    assert run("--cache-draws", "255") == "passed"
    assert "--cache-draws 256" in run("--cache-draws", "256")
    assert run("--val-fraction", "0.5", "--test-fraction", "0.49") == "passed"
    assert "--val-fraction plus --test-fraction" in run("--val-fraction", "0.5", "--test-fraction", "0.5")
    assert run("--max-new-tokens", str(room)) == "passed"
    assert f"use --max-new-tokens {room} or less" in run("--max-new-tokens", str(room + 1))


def test_02_keeps_a_sample_repeating_exactly_max_repeat_and_drops_the_second_copy():
    """keep_good: a share of repeated 4-grams equal to --max-repeat is kept, one above dropped; of two
    equal samples the first is kept; each drop counted once under its reason."""
    import torch
    L02 = load_lesson("02_generate.py")
    loop = [1, 2, 3, 4] * 3                       # 9 4-grams, 5 of them repeats: 5/9
    share = L02.repeated_ngram_fraction(loop)
    assert share == pytest.approx(5 / 9)
    other = list(range(20, 32))
    samples = [(torch.tensor([0] + loop), 1, 0), (torch.tensor([0] + other), 1, 1),
               (torch.tensor([0] + other), 1, 2), (torch.tensor([0] + list(range(40, 47))), 1, 3)]
    kept, dropped = L02.keep_good(samples, share)
    assert [n for _, _, n in kept] == [0, 1]
    assert dropped == {"empty or under 8 new tokens": 1, "repetitive": 0, "duplicate": 1}
    kept, dropped = L02.keep_good(samples, share - 1e-9)
    assert [n for _, _, n in kept] == [1] and dropped["repetitive"] == 1


def test_02_holds_out_one_opening_each_once_there_are_three():
    """With 3 openings and the default shares, val and test get one opening each (at least one once
    there are 3); with 2, a held-out split asked for is empty and refused in one line."""
    import torch
    L02 = load_lesson("02_generate.py")
    from common.plumbing.errors import LessonError
    args = argparse.Namespace(val_fraction=0.1, test_fraction=0.1, seed=0)
    for n in (3, 2):
        plan = [f"opening {i}" for i in range(n)] * 2
        kept = [(torch.tensor([0, 1]), 1, i) for i in range(len(plan))]
        if n == 3:
            splits = L02.split_by_opening(kept, plan, args)
            assert sorted(len(v) for v in splits.values()) == [2, 2, 2]
        else:
            with pytest.raises(LessonError, match="split is empty"):
                L02.split_by_opening(kept, plan, args)


def test_03_cuts_a_shape_up_to_the_teachers_own_and_refuses_one_more():
    """check_prunable: the teacher's own depth, width and heads may be kept; one more of any is
    refused, naming its flag."""
    L03 = load_lesson("03_student.py")
    from common.model import GPTConfig
    from common.plumbing.errors import LessonError
    t = GPTConfig(vocab_size=64, block_size=16, n_layer=3, n_head=4, n_embd=32)
    L03.check_prunable(argparse.Namespace(n_layer=3, n_embd=32, n_head=4), t)
    for flag, shape in (("--n-layer", (4, 32, 4)), ("--n-embd", (3, 40, 5)), ("--n-head", (3, 32, 5))):
        with pytest.raises(LessonError, match=flag):
            L03.check_prunable(argparse.Namespace(n_layer=shape[0], n_embd=shape[1], n_head=shape[2]), t)


def test_04s_misfits_at_their_edges():
    """refuse_misfits: a jsd beta or a skew inside (0, 1) goes, at 0 or 1 not; the sampled kinds need
    --on-policy exactly 1."""
    L04 = load_lesson("04_train.py")
    from common.plumbing.errors import LessonError

    def args(**kw):
        base = dict(kd="seq", jsd_beta=0.5, skew=0.1, on_policy=0.0, on_policy_temperature=1.0, soft_k=0,
                    soft_tail="renorm", kd_temperature=1.0)
        return argparse.Namespace(**{**base, **kw})
    for kd, name in (("jsd", "jsd_beta"), ("skl", "skew")):
        for x in (1e-6, 1 - 1e-6):
            L04.refuse_misfits(args(kd=kd, **{name: x}))
        for x in (0.0, 1.0):
            with pytest.raises(LessonError, match=name.replace("_", "-")):
                L04.refuse_misfits(args(kd=kd, **{name: x}))
    L04.refuse_misfits(args(kd="rkl-sampled", on_policy=1.0))
    with pytest.raises(LessonError, match="--on-policy 1"):
        L04.refuse_misfits(args(kd="rkl-sampled", on_policy=1 - 1e-6))


def test_04s_misfit_rules_on_every_combination_of_the_flags_they_read():
    """The four rules across flags that refuse_misfits judges, over a grid of values: refused exactly
    where the rule written out here says (--soft-k with soft and the renorm or rest tail only; a
    non-renorm tail with soft at T = 1 only; --on-policy with an online kind only; the sampled kinds
    at 1 and 1 only). The single-flag ranges (--jsd-beta, --skew) are the test above."""
    import itertools
    L04 = load_lesson("04_train.py")
    from common.distill import ONLINE, SAMPLED
    from common.plumbing.errors import LessonError
    for kd, tail, k, T, p, pT in itertools.product(("seq", "soft", *ONLINE), ("renorm", "rest", "sampled"),
                                                   (0, 5), (1.0, 2.0), (0.0, 0.5, 1.0), (1.0, 0.7)):
        fits = ((not p or kd in ONLINE) and (kd not in SAMPLED or (p == 1 and pT == 1))
                and (not k or (kd == "soft" and tail in ("renorm", "rest")))
                and (tail == "renorm" or (kd == "soft" and T == 1)))
        args = argparse.Namespace(kd=kd, soft_tail=tail, soft_k=k, kd_temperature=T, on_policy=p,
                                  on_policy_temperature=pT, jsd_beta=0.5, skew=0.1)
        try:
            L04.refuse_misfits(args)
            refused = False
        except LessonError:
            refused = True
        assert refused != fits, vars(args)


def test_04_takes_soft_k_up_to_the_stored_k(start_copy, monkeypatch):
    """--soft-k equal to the K that 02 stored goes; one more is refused, saying the K."""
    import torch

    import common.plumbing.train_inputs as inputs
    K = torch.load(start_copy / "generated.pt", weights_only=False)["train_topk_ids"][0].size(-1)
    base = ["04_train.py", "--preset", "tiny", "--out", str(start_copy), "--kd", "soft"]
    assert checked(base + ["--soft-k", str(K)], monkeypatch, inputs, "load_student") == "passed"
    assert f"keeps the teacher's top {K}" in checked(base + ["--soft-k", str(K + 1)], monkeypatch, inputs,
                                                     "load_student")


def test_a_sample_may_fill_the_students_and_the_teachers_context_exactly(start_copy):
    """load_student and load_teacher take samples as long as the context, and refuse one token more."""
    import torch

    from common.plumbing.device import precision
    from common.plumbing.errors import LessonError
    from common.plumbing.train_inputs import load_student, load_teacher
    for file, load in (("student_init.pt", lambda p, n: load_student(p, "tiny", 0.0, n)),
                       ("teacher.pt", lambda p, n: load_teacher(p, n, precision("cpu")))):
        n = torch.load(start_copy / file, weights_only=False)["config"]["block_size"]
        load(str(start_copy / file), n)
        with pytest.raises(LessonError, match="context"):
            load(str(start_copy / file), n + 1)


def test_05_scores_a_text_of_two_tokens_refuses_one_and_cuts_at_max_tokens(tmp_path):
    """long_texts: 2 tokens are the least a text can be scored on (one predicted); --max-tokens N keeps
    exactly N tokens; "<|endoftext|>" in a file is the separator token."""
    L05 = load_lesson("05_evaluate.py")
    from common.plumbing.errors import LessonError
    from common.tokenizer import get_tokenizer
    enc = get_tokenizer()
    two, one, long = tmp_path / "two.txt", tmp_path / "one.txt", tmp_path / "long.txt"
    two.write_text(" the cat")
    one.write_text(" the")
    long.write_text(" the cat sat on the mat" * 5)
    assert len(enc.encode(two.read_text())) == 2 and len(enc.encode(one.read_text())) == 1

    def texts(paths, max_tokens=0):
        return L05.long_texts(argparse.Namespace(wikitext=False, eval_text=[str(p) for p in paths],
                                                 max_tokens=max_tokens), enc)[0]
    assert len(texts([two])["two.txt"]) == 2
    with pytest.raises(LessonError, match="fewer than 2 tokens"):
        texts([one])
    assert len(texts([long], max_tokens=7)["long.txt"]) == 7
    assert len(texts([long])["long.txt"]) == 30
    # a file's "<|endoftext|>" is the document separator the models know, one token, not 7 of plain text
    docs = tmp_path / "docs.txt"
    docs.write_text(" the cat<|endoftext|> the mat")
    assert texts([docs])["docs.txt"].tolist() == enc.encode(" the cat") + [50256] + enc.encode(" the mat")


def test_08s_checks_at_their_edges(course_copy, monkeypatch):
    """--draft-tokens takes 1 (and a list with a trailing comma) and refuses 0, nothing, a fraction; a
    prompt plus --new-tokens may fill the context exactly."""
    import torch

    import common.perplexity
    L08 = "08_speculative.py"
    data = torch.load(course_copy / "generated.pt", weights_only=False)
    block = torch.load(course_copy / "teacher.pt", weights_only=False)["config"]["block_size"]
    room = block - max(data["test_prompt_lens"][:2])
    base = [L08, "--preset", "tiny", "--out", str(course_copy), "--prompts", "2", "--repeats", "1"]

    def run(*flags):
        return checked(base + list(flags), monkeypatch, common.perplexity, "score_sampled")
    assert run("--draft-tokens", "1", "--new-tokens", str(room)) == "passed"
    assert "--draft-tokens '0,1'" in run("--draft-tokens", "0,1", "--new-tokens", "4")
    assert run("--draft-tokens", "2, 1,", "--new-tokens", "4") == "passed"  # spaces and a trailing comma
    for bad in (",", "1.5", "two"):
        assert f"--draft-tokens {bad!r}: give whole numbers >= 1" in run("--draft-tokens", bad, "--new-tokens", "4")
    assert "longer than the models' context" in run("--draft-tokens", "1", "--new-tokens", str(room + 1))


def test_09_cuts_as_many_blocks_as_the_teacher_has_and_refuses_one_more(course_copy, monkeypatch, tmp_path):
    """--n-layer equal to the teacher's depth goes on to the runs; one more is refused."""
    import torch

    from common.plumbing import runs
    n = torch.load(course_copy / "teacher.pt", weights_only=False)["config"]["n_layer"]
    base = ["09_starts.py", "--preset", "tiny", "--out", str(course_copy), "--seeds", "1"]
    assert checked(base + ["--n-layer", str(n)], monkeypatch, runs, "run_script") == "passed"
    assert f"--n-layer {n + 1}" in checked(base + ["--n-layer", str(n + 1)], monkeypatch, runs, "run_script")


def test_a_client_error_is_final_and_a_server_error_is_retried(monkeypatch, tmp_path, capsys):
    """download: HTTP 400 and 499 stop at once; 500 is retried (the server may come back)."""
    import io
    import urllib.error
    import urllib.request

    from common.plumbing import download
    from common.plumbing.errors import LessonError
    calls = []

    def fail_with(code):
        def urlopen(request, timeout=None):
            calls.append(code)
            raise urllib.error.HTTPError(request.full_url, code, "nope", {}, io.BytesIO())
        return urlopen
    monkeypatch.setattr(download.time, "sleep", lambda s: None)
    for code, tries in ((400, 1), (499, 1), (500, 3)):
        calls.clear()
        monkeypatch.setattr(urllib.request, "urlopen", fail_with(code))
        with pytest.raises(LessonError, match=f"HTTP {code}"):
            download.download("http://127.0.0.1:9/x", str(tmp_path / "x"), retries=3, quiet=True)
        assert len(calls) == tries, code
    # 3 attempts are 2 retries, each said with its number of the 2
    assert capsys.readouterr().out == "".join(f"  connection lost (HTTP 500); retrying ({i}/2)\n" for i in (1, 2))


def test_a_file_is_as_expected_only_at_its_size_exactly_and_with_its_sha256(tmp_path):
    """_verify: one byte fewer or more is refused by its size, whatever the sha256 (None: not known)."""
    import hashlib

    from common.plumbing import download
    path = tmp_path / "f"
    path.write_bytes(b"12345")
    sha = hashlib.sha256(b"12345").hexdigest()
    assert download._verify(str(path), 5, sha) is None and download._verify(str(path), None, None) is None
    assert download._verify(str(path), 4, None) == "5 bytes instead of 4"
    assert download._verify(str(path), 6, None) == "5 bytes instead of 6"
    assert download._verify(str(path), 5, "0" * 64) == "its sha256 does not match"


def test_a_log_line_says_every_number_of_its_step_and_whose_text_it_was_on(monkeypatch):
    """Speedometer.line on a clock set by hand, field by field: the step of the total, the epoch
    counted from 1, the loss, exp of the cross-entropy (capped at e^50) on whose text, the rate, the
    norm, the student's own sampling speed; fmt_time at its minute's edges."""
    import types

    from common.plumbing import progress
    assert [progress.fmt_time(s) for s in (0, 59, 60, 61, 125, 3600)] == ["0s", "59s", "1m00s", "1m01s",
                                                                          "2m05s", "60m00s"]
    monkeypatch.setattr(progress.time, "time", lambda: 102.0)
    state = types.SimpleNamespace(step=4, history={"loss": [1.25], "ce": [2.0], "lr": [3e-4],
                                                   "grad_norm": [0.75]})
    for on_policy, whose in ((0.0, ""), (1.0, " on own text"), (0.5, " on own + teacher text")):
        speed = progress.Speedometer(started=100.0, last=100.0, tokens=4000, on_policy=on_policy)
        speed.sampled(0.25, 600)  # two micro-batches' sampling in the interval: both counted
        speed.sampled(0.25, 400)
        text = speed.line(state, 10, 1, 2, 0)  # 2 s since the last line, 2 steps: 1000 ms a step
        assert text == (f"step    4/10 | epoch 2 | loss 1.2500 | ppl{whose} 7.4 | lr 3.0e-04 | norm 0.75 | "
                        f"1000 ms | 2.0k tok/s (student sampling 2.0k tok/s) | eta 3s")
        assert (speed.tokens, speed.sampled_tokens, speed.sampled_time) == (0, 0, 0.0)
    state.history["ce"] = [80.0]
    assert "| ppl 5184705528587072045056.0 |" in progress.Speedometer(started=100.0, last=100.0).line(
        state, 10, 0, 2, 0)  # e^50, not an overflow


def test_a_run_is_kept_resumed_or_trained_afresh_by_its_recipe(tmp_path):
    """plan_run: a new folder is fresh; the same recipe with a train_log written after it is done
    (written the same second too); without one, a state saved under it resumes; other flags, an input
    or a start of another size or time, or --fresh, train afresh, never resuming an older recipe's
    state; the inputs are linked into the run's folder."""
    import json
    import time

    from common.plumbing.runs import plan_run
    out, sub = tmp_path / "out", tmp_path / "out" / "run"
    out.mkdir()
    (out / "a.pt").write_text("a")
    start = tmp_path / "start.pt"
    start.write_text("s")

    def plan(flags=("--kd", "seq"), fresh=False):
        return plan_run(str(out), str(sub), list(flags), str(start), fresh, ["a.pt"])

    def touch(path, t):
        path.write_text("x")
        os.utime(path, (t, t))
    assert plan() == "fresh" and (sub / "a.pt").read_text() == "a"
    recipe = json.loads((sub / "method.json").read_text())
    assert recipe["flags"] == ["--kd", "seq"] and set(recipe) == {"flags", "inputs", "start"}
    assert plan() == "fresh"                      # nothing trained yet
    t = time.time() - 100                         # the recipe written 100 s ago
    os.utime(sub / "method.json", (t, t))
    touch(sub / "train_state.pt", t + 1)          # saved under it
    assert plan() == "resume"
    touch(sub / "train_log.pt", t)
    assert plan() == "done"                       # the same second counts as after
    touch(sub / "train_log.pt", t - 5)
    assert plan() == "resume"                     # a log from before the recipe is not its log
    assert plan(["--kd", "rkl"]) == "fresh"       # other flags: a new recipe, the old one's state
    assert plan(["--kd", "rkl"]) == "fresh"       # not resumed, now or later
    touch(sub / "train_log.pt", time.time() + 10)
    assert plan(["--kd", "rkl"]) == "done"
    assert plan(["--kd", "rkl"], fresh=True) == "fresh"
    touch(sub / "train_log.pt", time.time() + 20)
    assert plan(["--kd", "rkl"]) == "done"
    (out / "a.pt").write_text("ab")               # an input of another size
    assert plan(["--kd", "rkl"]) == "fresh"
    touch(sub / "train_log.pt", time.time() + 30)
    start.write_text("t")                         # the start rewritten, same size, later
    os.utime(start, (time.time() + 40, time.time() + 40))
    assert plan(["--kd", "rkl"]) == "fresh"


def write_safetensors(path, header, data=b""):
    """A safetensors file by hand: 8 bytes of header length, the JSON header, the data."""
    import json
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return str(path)


def test_a_safetensors_file_is_read_to_its_last_byte_and_refused_one_past(tmp_path):
    """read_safetensors at its edges: a tensor ending at the file's last byte is read, one byte more
    is corrupt; a header as long as the file allows is read, one byte longer refused; fewer than 8
    bytes refused; an empty tensor; a negative offset; a header that is not a JSON object."""
    import struct

    import torch

    from common.gpt2_weights import CheckpointError, read_safetensors
    data = struct.pack("<3f", 1.5, -2.0, 0.25)
    good = write_safetensors(tmp_path / "a.safetensors", {
        "x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
        "e": {"dtype": "F32", "shape": [0, 4], "data_offsets": [12, 12]}, "__metadata__": {"format": "pt"}}, data)
    t = read_safetensors(good)
    assert t["x"].tolist() == [1.5, -2.0, 0.25] and t["e"].shape == (0, 4) and set(t) == {"x", "e"}
    for name, header, body in (
            ("past the end", {"x": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}}, data),
            ("short data", {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}, data[:11]),
            ("wrong size", {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, data),
            ("negative", {"x": {"dtype": "F32", "shape": [3], "data_offsets": [-12, 0]}}, data)):
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            read_safetensors(write_safetensors(tmp_path / f"{name}.safetensors", header, body))
    with pytest.raises(CheckpointError, match="bad header entry for x"):
        read_safetensors(write_safetensors(tmp_path / "d.safetensors", {"x": {"dtype": "F33", "shape": [3],
                                                                         "data_offsets": [0, 12]}}, data))
    with pytest.raises(CheckpointError, match="not JSON"):
        read_safetensors(write_safetensors(tmp_path / "l.safetensors", [1, 2]))
    # the header's length: all of the rest of the file is allowed, one byte more is not
    (tmp_path / "h.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    assert read_safetensors(str(tmp_path / "h.safetensors")) == {}
    (tmp_path / "h.safetensors").write_bytes((3).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="header of 3 bytes in a 10-byte file"):
        read_safetensors(str(tmp_path / "h.safetensors"))
    for n in (7, 0):
        (tmp_path / "s.safetensors").write_bytes(b"\0" * n)
        with pytest.raises(CheckpointError, match=f"only {n} bytes"):
            read_safetensors(str(tmp_path / "s.safetensors"))
    (tmp_path / "8.safetensors").write_bytes(b"\0" * 8)  # 8 bytes: a header of 0 bytes, not JSON
    with pytest.raises(CheckpointError, match="not JSON"):
        read_safetensors(str(tmp_path / "8.safetensors"))
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "m.bin")  # a training checkpoint's weights
    from common.gpt2_weights import read_weights_file
    assert read_weights_file(str(tmp_path / "m.bin"))["w"].tolist() == [1.0, 1.0]
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "n.bin")
    with pytest.raises(CheckpointError, match="dict of tensors"):
        read_weights_file(str(tmp_path / "n.bin"))


def test_a_gpt2_config_is_read_or_inferred_and_refused_where_it_cannot_be(tmp_path):
    """config_from_json: n_positions, else n_ctx; another model_type or a missing field refused.
    infer_config: the heads from a width that is a multiple of 64, the depth from the highest block
    number, refused without wte or wpe or at a width of another multiple."""
    import json

    import torch

    from common.gpt2_weights import CheckpointError, config_from_json, infer_config
    path = tmp_path / "config.json"
    base = {"vocab_size": 11, "n_layer": 3, "n_head": 2, "n_embd": 8}
    for extra, block in (({"n_positions": 32, "n_ctx": 16}, 32), ({"n_ctx": 16}, 16)):
        path.write_text(json.dumps({**base, **extra}))
        c = config_from_json(str(path))
        assert (c.block_size, c.vocab_size, c.n_layer, c.n_head, c.n_embd) == (block, 11, 3, 2, 8)
        assert c.layer_norm_eps == 1e-5
    path.write_text(json.dumps({**base, "n_positions": 32, "layer_norm_epsilon": 1e-6, "model_type": "gpt2"}))
    assert config_from_json(str(path)).layer_norm_eps == 1e-6
    path.write_text(json.dumps({**base, "n_positions": 32, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="'llama' model, not GPT-2"):
        config_from_json(str(path))
    path.write_text(json.dumps({"n_positions": 32, "vocab_size": 11, "n_layer": 3, "n_head": 2}))
    with pytest.raises(CheckpointError, match="lacks n_embd"):
        config_from_json(str(path))
    sd = {"wte.weight": torch.zeros(11, 128), "wpe.weight": torch.zeros(20, 128), "h.0.ln_1.weight": 0,
          "h.4.ln_1.weight": 0, "h.10.mlp.c_fc.bias": 0}
    c = infer_config(sd, "w")
    assert (c.block_size, c.vocab_size, c.n_layer, c.n_head, c.n_embd) == (20, 11, 11, 2, 128)
    with pytest.raises(CheckpointError, match="missing wpe.weight"):
        infer_config({"wte.weight": sd["wte.weight"]}, "w")
    with pytest.raises(CheckpointError, match="width 96 is not a multiple of 64"):
        infer_config({"wte.weight": torch.zeros(11, 96), "wpe.weight": torch.zeros(20, 96)}, "w")


def test_a_run_makes_its_student_only_when_it_starts_afresh(tmp_path, monkeypatch):
    """runs.train: a fresh run calls 03 then 04; a resumed one 04 with --resume alone (03 again would
    write a new student_init.pt under the state it resumes); a run done is read, not run."""
    import time

    import torch

    from common.plumbing import runs
    out, sub = tmp_path / "out", tmp_path / "out" / "run"
    out.mkdir()
    (out / "a.pt").write_text("a")
    called = []
    monkeypatch.setattr(runs, "run_or_refuse", lambda script, flags, label: called.append((script, flags)))
    monkeypatch.setattr(runs, "load_artifact", lambda path, kind: {"path": path})

    def train():
        called.clear()
        return runs.train("x", str(sub), ["--epochs", "1"], str(out), None, False, ["a.pt"], ["--seed", "1"])
    train()
    assert called == [("03_student.py", ["--seed", "1"]), ("04_train.py", ["--epochs", "1"])]
    t = time.time() - 100
    os.utime(sub / "method.json", (t, t))
    torch.save({}, sub / "train_state.pt")  # saved under this recipe, after it
    train()
    assert called == [("04_train.py", ["--epochs", "1", "--resume"])]
    torch.save({}, sub / "train_log.pt")
    assert train() == {"path": f"{sub}/train_log.pt"} and called == []


def test_08_marks_a_speedup_as_noise_only_above_the_tokens_per_call():
    """A free draft would give a speedup of the tokens per teacher call; at it, not above, a speedup
    is possible; above the prediction (which counts the draft's cost) it is possible too."""
    L08 = load_lesson("08_speculative.py")
    row = {"speedup": 2.0, "speedup_lo": 1.9, "speedup_hi": 2.1, "tokens_per_call": 2.0, "predicted": 1.5}
    assert L08.speedup_text(row) == "2.00x (1.90-2.10)"
    assert L08.speedup_text({**row, "speedup": 2.01}).endswith(" (above the tokens per call: noise)")
    assert "noise" not in L08.speedup_text({**row, "speedup": 1.6, "predicted": 1.0})


def test_03_notes_a_student_as_large_as_its_teacher_and_only_then(start_copy):
    for shape, note in ((("2", "64", "4"), True), (("2", "60", "4"), False)):
        r = run_here(["03_student.py", "--preset", "tiny", "--out", str(start_copy), "--n-layer", shape[0],
                      "--n-embd", shape[1], "--n-head", shape[2]])
        assert r.returncode == 0, r.stdout + r.stderr
        assert ("NOTE: this student is not smaller than its teacher" in r.stdout) == note, shape


def test_04s_dropout_reaches_the_student_it_trains_with_the_same_weights(start_copy):
    """load_student (04's --dropout): the student is rebuilt with that dropout everywhere (its
    attention too), its weights the checkpoint's; at 0, no dropout anywhere."""
    import torch

    from common.plumbing.train_inputs import load_student
    x = torch.randint(0, 1000, (2, 16))
    for p in (0.0, 0.2):
        student, ckpt = load_student(str(start_copy / "student_init.pt"), "tiny", p, 16)
        drops = [m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)]
        assert student.config.dropout == p and drops and set(drops) == {p}
        assert all(m.dropout == p for m in student.modules() if hasattr(m, "c_attn"))
        assert all(torch.equal(v, ckpt["model"][k]) for k, v in student.state_dict().items())
        with torch.no_grad():
            differ = not torch.equal(student.train()(x)[0], student(x)[0])
        assert differ == (p > 0)


def test_05_measures_a_pretrained_teacher_as_the_students_start(course_copy):
    """docs/your-models.md: the start may be a GPT-2 written by 01 (a teacher-kind student_init.pt),
    trained by 04 into student.pt. 05 measures it as the start, not refused: here the teacher itself
    as the start and, relabelled, as the student, so all three perplexities on every set are one."""
    import shutil

    import torch

    from common.plumbing.artifacts import load_artifact
    shutil.copy(course_copy / "teacher.pt", course_copy / "student_init.pt")
    ckpt = torch.load(course_copy / "teacher.pt", weights_only=False)
    torch.save({**ckpt, "kind": "student"}, course_copy / "student.pt")
    r = run_here(["05_evaluate.py", "--preset", "tiny", "--out", str(course_copy)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ev = load_artifact(str(course_copy / "eval.pt"), "eval")
    for set_name, p in ev["perplexity"].items():
        assert p["student_init"] == pytest.approx(p["teacher"], rel=1e-6), set_name
        assert p["student"] == pytest.approx(p["teacher"], rel=1e-6), set_name


def test_a_failed_run_is_reported_by_its_last_error_line(monkeypatch):
    """run_or_refuse with the run's output set by hand: a lesson that failed after another error
    line had been printed (a retried download, a warning) is named by its last "error:" line, the one
    its exit came from (fails with the first); none printed: the exit code; exit 0: no refusal."""
    from common.plumbing import runs
    from common.plumbing.errors import LessonError
    out = ["error: could not reach the hub, trying again\n", "step 1/4\n", "error: run 03_student.py first\n",
           "bye\n"]
    monkeypatch.setattr(runs, "run_script", lambda script, flags: (1, out))
    with pytest.raises(LessonError) as e:
        runs.run_or_refuse("04_train.py", [], "seq, seed 1")
    assert str(e.value) == ("04_train.py failed for seq, seed 1 (error: run 03_student.py first); the runs "
                            "before it are kept")
    monkeypatch.setattr(runs, "run_script", lambda script, flags: (2, ["step 1/4\n"]))
    with pytest.raises(LessonError, match=r"failed for seq, seed 1 \(exit code 2\)"):
        runs.run_or_refuse("04_train.py", [], "seq, seed 1")
    monkeypatch.setattr(runs, "run_script", lambda script, flags: (0, out))
    runs.run_or_refuse("04_train.py", [], "seq, seed 1")


def test_a_loaded_model_is_ready_to_be_measured_in_eval_mode(tmp_path):
    """load_model hands back a model in eval mode, whatever it was saved in: a student trained with
    --dropout (05, 06, 08 and 09 load it to measure it) gives the same logits twice (fails with the
    model left in training mode: its dropout draws new masks at every call)."""
    import torch

    from common.model import GPT, GPTConfig
    from common.plumbing.artifacts import load_model, model_checkpoint, save_artifact
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16, dropout=0.5)).train()
    save_artifact(model_checkpoint(model, "student"), str(tmp_path / "student.pt"))
    loaded, _ = load_model(str(tmp_path / "student.pt"), "student")
    x = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        assert not loaded.training and torch.equal(loaded(x)[0], loaded(x)[0])
    # the vocabulary the caller's tokenizer has: equal goes, one fewer or one more is refused
    from common.plumbing.errors import LessonError
    assert load_model(str(tmp_path / "student.pt"), "student", vocab_size=50)[0].config.vocab_size == 50
    for other in (49, 51):
        with pytest.raises(LessonError, match=f"built for a vocabulary of 50 tokens, but the GPT-2 tokenizer has {other}"):
            load_model(str(tmp_path / "student.pt"), "student", vocab_size=other)


def test_a_run_folders_link_to_an_input_given_by_a_relative_path_resolves(tmp_path, monkeypatch):
    """runs.link("out/teacher.pt", "out/methods/x/teacher.pt"), as 07 and 09 call it with a relative
    --out: the link reads the file, wherever the link sits (a link holds its path as written)."""
    from common.plumbing.runs import link
    monkeypatch.chdir(tmp_path)
    os.makedirs("out/methods/x")
    (tmp_path / "out" / "teacher.pt").write_text("weights")
    link("out/teacher.pt", "out/methods/x/teacher.pt")
    assert open("out/methods/x/teacher.pt").read() == "weights"
    link("out/teacher.pt", "out/methods/x/teacher.pt")  # again, over the old link
    assert open("out/methods/x/teacher.pt").read() == "weights"
