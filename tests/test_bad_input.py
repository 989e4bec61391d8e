"""Bad input never ends in a traceback or a lost file: every case runs the real lessons on a copy of
the tiny course and checks the exit code, the message, and that the other artifacts are untouched."""
import hashlib
import os
import runpy
import signal
import subprocess
import sys

import pytest
import torch

from common.plumbing.artifacts import load_artifact, save_artifact
from conftest import ROOT, run_here, run_py

ARTIFACTS = ["teacher.pt", "generated.pt", "student_init.pt", "student.pt", "train_log.pt", "eval.pt"]


def digests(folder):
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in sorted(os.listdir(folder))
            if (folder / f).is_file()}


def check_refused(r, *words, code=None):
    assert r.returncode != 0 if code is None else r.returncode == code, r.stdout[-2000:] + r.stderr[-2000:]
    message = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"
    assert "Traceback" not in r.stderr + r.stdout


# --- damaged, missing and mismatched artifacts: (what to do to the copy, lesson, expected words) ---

def remove(name):
    return lambda d: os.remove(d / name)


def truncate(name):
    return lambda d: (d / name).write_bytes((d / name).read_bytes()[:2000])


def random_bytes(name):
    return lambda d: (d / name).write_bytes(os.urandom(5000))


def copy(src, dst):
    return lambda d: (d / dst).write_bytes((d / src).read_bytes())


def edit(name, change):
    def do(d):
        obj = torch.load(d / name, weights_only=True)
        change(obj)
        torch.save(obj, d / name)
    return do


def student_init_with_short_context(d):
    from common.model import GPT, GPTConfig
    from common.plumbing.artifacts import model_checkpoint
    save_artifact(model_checkpoint(GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)), "student_init"),
                  d / "student_init.pt")


def other_student_init(d):
    r = run_here(["03_student.py", "--out", str(d), "--preset", "tiny", "--n-embd", "64"])
    assert r.returncode == 0, r.stderr


class Unsafe:
    pass


CASES = [
    ("no teacher for 02", remove("teacher.pt"), ["02_generate.py"], ["teacher.pt not found", "run 01_teacher.py first"]),
    ("no teacher for 03", remove("teacher.pt"), ["03_student.py"], ["teacher.pt not found", "run 01_teacher.py first"]),
    ("no data for 04", remove("generated.pt"), ["04_train.py"], ["generated.pt not found", "run 02_generate.py first"]),
    ("no student_init for 04", remove("student_init.pt"), ["04_train.py"], ["run 03_student.py first"]),
    ("no student for 05", remove("student.pt"), ["05_evaluate.py"], ["student.pt not found", "run 04_train.py first"]),
    ("no data for 05", remove("generated.pt"), ["05_evaluate.py"], ["run 02_generate.py first"]),
    ("no eval for 06", remove("eval.pt"), ["06_compare.py"], ["eval.pt not found", "run 05_evaluate.py first"]),
    ("no log for 06", remove("train_log.pt"), ["06_compare.py"], ["train_log.pt not found", "run 04_train.py"]),
    ("no state to resume", remove("train_state.pt"), ["04_train.py", "--resume"], ["train_state.pt not found"]),
    ("truncated teacher", truncate("teacher.pt"), ["02_generate.py"], ["teacher.pt is truncated or not a checkpoint",
                                                                       "run 01_teacher.py again"]),
    ("random-byte data", random_bytes("generated.pt"), ["04_train.py"], ["generated.pt is truncated or not a checkpoint"]),
    ("random-byte student", random_bytes("student.pt"), ["06_compare.py"], ["student.pt is truncated", "04_train.py"]),
    ("data as teacher", copy("generated.pt", "teacher.pt"), ["03_student.py"],
     ["is a generated-data file, not a teacher checkpoint"]),
    ("teacher as data", copy("teacher.pt", "generated.pt"), ["04_train.py"],
     ["is a teacher checkpoint, not a generated-data file"]),
    ("teacher as eval", copy("teacher.pt", "eval.pt"), ["06_compare.py"], ["not an evaluation results file"]),
    ("unsafe pickle", lambda d: torch.save({"kind": "teacher", "x": Unsafe()}, d / "teacher.pt"), ["03_student.py"],
     ["safe load refuses", "run 01_teacher.py again"]),
    ("no weights in teacher", edit("teacher.pt", lambda o: o.pop("model")), ["02_generate.py"], ["lacks model"]),
    ("missing tensor in teacher", edit("teacher.pt", lambda o: o["model"].pop("transformer.h.1.mlp.c_fc.weight")),
     ["03_student.py"], ["does not match its own config", "transformer.h.1.mlp.c_fc.weight"]),
    ("other vocabulary", edit("teacher.pt", lambda o: o["config"].update(vocab_size=500) or o["model"].update(
        {k: o["model"][k][:500] for k in ("transformer.wte.weight", "lm_head.weight")})), ["02_generate.py"],
     ["vocabulary of 500 tokens", "50257"]),
    ("samples longer than the student's context", student_init_with_short_context, ["04_train.py"],
     ["longer than the student's context", "--max-new-tokens"]),
    ("student from another init", other_student_init, ["05_evaluate.py"], ["student.pt does not match"]),
    ("no top-K for soft KD", edit("generated.pt", lambda o: o.update(train_topk_ids=[])), ["04_train.py", "--kd", "soft"],
     ["--topk-logits"]),
    ("rkl-sampled off its own samples", lambda d: None, ["04_train.py", "--kd", "rkl-sampled", "--on-policy", "0.5"],
     ["--kd rkl-sampled needs --on-policy 1", "unbiased only on tokens the student drew"]),
    ("rkl-sampled at another temperature", lambda d: None,
     ["04_train.py", "--kd", "rkl-sampled", "--on-policy", "1", "--on-policy-temperature", "0.7"],
     ["--on-policy-temperature 1"]),
    ("rest bucket at T=2", lambda d: None, ["04_train.py", "--kd", "soft", "--soft-tail", "rest"],
     ["--soft-tail rest needs --kd soft and --kd-temperature 1", "at T = 1 only"]),
    ("a sampled cache of over 255 draws", lambda d: None, ["02_generate.py", "--cache-draws", "300"],
     ["--cache-draws 300: at most 255"]),
    ("skew KL at a skew of 0", lambda d: None, ["04_train.py", "--kd", "skl", "--skew", "0"],
     ["--skew must be strictly between 0 and 1"]),
    ("more of the top-K than stored", lambda d: None, ["04_train.py", "--kd", "soft", "--soft-k", "40"],
     ["--soft-k 40", "top 32"]),
    ("part of the top-K without soft KD", lambda d: None, ["04_train.py", "--soft-k", "5"], ["--soft-k keeps part"]),
    ("rkl-vopd off its own samples", lambda d: None, ["04_train.py", "--kd", "rkl-vopd"],
     ["--kd rkl-vopd needs --on-policy 1"]),
    ("gpt2-preset student for a tiny teacher", lambda d: None, ["03_student.py", "--preset", "gpt2"],
     ["teacher.pt was made with the tiny preset, this lesson runs the gpt2 preset", "add --preset tiny"]),
    ("gpt2-preset training on tiny data", lambda d: None, ["04_train.py", "--preset", "gpt2"],
     ["generated.pt was made with the tiny preset", "add --preset tiny"]),
]


@pytest.mark.parametrize("name,damage,cmd,words", CASES, ids=[c[0] for c in CASES])
def test_bad_artifact(course_copy, name, damage, cmd, words):
    damage(course_copy)
    before = digests(course_copy)
    r = run_here([cmd[0], "--out", str(course_copy), "--preset", "tiny", *cmd[1:]])
    check_refused(r, *words, code=1)
    assert digests(course_copy) == before  # nothing overwritten, nothing half-written left behind


# --- a tensor of the right size in the wrong shape ---

@pytest.mark.parametrize("name, reshape", [
    ("transformer.h.0.mlp.c_fc.weight", lambda t: t.T.contiguous()),  # transposed: (8, 32)
    ("transformer.wpe.weight", lambda t: t.reshape(8, 32)),             # (32, 8) read as (8, 32)
    ("transformer.ln_f.weight", lambda t: t[None]),                     # a gain as a (1, 8) row
], ids=["transposed", "reshaped", "unsqueezed"])
def test_a_checkpoint_tensor_of_the_right_size_and_the_wrong_shape_is_refused_in_one_line(tmp_path, name, reshape):
    """teacher.pt (GPT-2's vocabulary, a small shape) with one tensor holding as many numbers as its
    config asks for but in another shape: 02 refuses it in one line naming the tensor, both shapes
    and the lesson to run again, and writes nothing. Fails with a check on sizes alone (the tensor
    reaches load_state_dict's size-mismatch traceback, or loads transposed weights)."""
    from common.model import GPT, GPTConfig
    from common.plumbing.artifacts import model_checkpoint
    torch.manual_seed(0)
    ckpt = model_checkpoint(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=32)), "teacher", preset="tiny")
    want = tuple(ckpt["model"][name].shape)
    ckpt["model"][name] = reshape(ckpt["model"][name])
    got = tuple(ckpt["model"][name].shape)
    save_artifact(ckpt, tmp_path / "teacher.pt")
    before = digests(tmp_path)
    r = run_here(["02_generate.py", "--out", str(tmp_path), "--preset", "tiny"])
    check_refused(r, f"teacher.pt: {name} has shape {got}, its config says {want}", "run 01_teacher.py again",
                  code=1)
    assert digests(tmp_path) == before


# --- --weights files for lesson 01 ---

def test_weights_broken_header_missing_key_and_missing_path(tmp_path):
    from safetensors.torch import save_file
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((123456789).to_bytes(8, "little") + b'{"a": 1}')
    check_refused(run_here(["01_teacher.py", "--weights", str(bad), "--out", str(tmp_path)]),
                  "not a valid safetensors file", code=1)
    from conftest import hf_model
    sd = dict(hf_model(n_embd=128, n_head=2).transformer.state_dict())
    del sd["h.0.mlp.c_fc.weight"]
    save_file(sd, tmp_path / "partial.safetensors")
    check_refused(run_here(["01_teacher.py", "--weights", str(tmp_path / "partial.safetensors"), "--out", str(tmp_path)]),
                  "missing h.0.mlp.c_fc.weight", code=1)
    check_refused(run_here(["01_teacher.py", "--weights", str(tmp_path / "nowhere"), "--out", str(tmp_path)]),
                  "does not exist", code=2)
    assert not (tmp_path / "teacher.pt").exists()


# --- every numeric flag refuses bad values at parse time (argparse: exit 2, a usage line) ---

BAD_FLAGS = [
    ("02_generate.py", "--num-samples", "0"), ("02_generate.py", "--max-new-tokens", "-5"),
    ("02_generate.py", "--temperature", "-0.1"), ("02_generate.py", "--top-k", "0"),
    ("02_generate.py", "--top-p", "0"), ("02_generate.py", "--top-p", "1.5"), ("02_generate.py", "--batch-size", "0"),
    ("02_generate.py", "--val-fraction", "1"), ("02_generate.py", "--test-fraction", "1"),
    ("02_generate.py", "--topk-logits", "-1"),
    ("02_generate.py", "--max-repeat", "2"), ("02_generate.py", "--seed", "x"),
    ("03_student.py", "--n-layer", "0"), ("03_student.py", "--n-embd", "0"), ("03_student.py", "--n-head", "-2"),
    ("04_train.py", "--epochs", "0"), ("04_train.py", "--batch-size", "0"), ("04_train.py", "--grad-accum", "0"),
    ("04_train.py", "--lr", "0"), ("04_train.py", "--lr", "nan"), ("04_train.py", "--min-lr-ratio", "2"),
    ("04_train.py", "--warmup-steps", "-1"), ("04_train.py", "--weight-decay", "-0.1"),
    ("04_train.py", "--grad-clip", "0"), ("04_train.py", "--dropout", "1.5"), ("04_train.py", "--kd-alpha", "1.1"),
    ("04_train.py", "--kd-temperature", "0"), ("04_train.py", "--log-interval", "0"),
    ("04_train.py", "--stop-after", "0"), ("04_train.py", "--kd", "hard"), ("04_train.py", "--dtype", "fp8"),
    ("04_train.py", "--jsd-beta", "-0.1"), ("04_train.py", "--jsd-beta", "1.5"),
    ("05_evaluate.py", "--stride", "0"), ("05_evaluate.py", "--batch-size", "0"), ("05_evaluate.py", "--max-tokens", "-1"),
    ("05_evaluate.py", "--eval-text", "/no/such/file.txt"),
    ("06_compare.py", "--max-new-tokens", "0"), ("06_compare.py", "--seed", "1.5"),
    ("01_teacher.py", "--model", "gpt3"), ("01_teacher.py", "--preset", "huge"),
]


@pytest.mark.parametrize("lesson,flag,value", BAD_FLAGS, ids=[f"{a[:2]}{b}={c}" for a, b, c in BAD_FLAGS])
def test_bad_flag_is_refused_at_parse_time(tmp_path, monkeypatch, capsys, lesson, flag, value):
    monkeypatch.setattr(sys, "argv", [lesson, "--out", str(tmp_path), flag, value])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, lesson), run_name="__main__")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "usage:" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("lesson, flag, value, what", [
    ("07_methods.py", "--methods", "", "method"), ("07_methods.py", "--methods", ",", "method"),
    ("09_starts.py", "--starts", "", "start"), ("09_starts.py", "--starts", " , ", "start"),
    ("10_bytes.py", "--methods", ",", "method"), ("10_bytes.py", "--methods", "tokens,bogus", "method"),
], ids=["07-empty", "07-comma", "09-empty", "09-blanks", "10-comma", "10-unknown"])
def test_a_list_of_names_with_none_or_an_unknown_one_is_refused_in_one_line(tmp_path, lesson, flag, value, what):
    """--methods and --starts name what to run: a list that names nothing (empty, or only commas)
    is refused like an unknown name, in one line that lists the choices, before any input is read
    and nothing written. Fails with an empty list accepted (nothing would run, or the run would
    stop on an input it never needed)."""
    r = run_here([lesson, "--out", str(tmp_path), "--preset", "tiny", flag, value])
    check_refused(r, f"unknown {what} ", "choose among", code=1)
    message = r.stderr.strip().splitlines()[-1]
    assert ("(none)" in message) == (value.replace(",", "").strip() == ""), message
    assert os.listdir(tmp_path) == []


def test_run_all_refuses_unknown_options():
    r = subprocess.run(["bash", "run_all.sh", "--epochs", "3"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "only --preset and --out" in r.stderr


def test_preset_advice_is_a_flag_in_a_shell_and_env_in_a_notebook(monkeypatch):
    from common.plumbing import cli
    assert cli.preset_advice("tiny") == "add --preset tiny"
    monkeypatch.setattr(sys, "argv", ["/usr/lib/python3/dist-packages/ipykernel_launcher.py", "-f", "k.json"])
    assert cli.preset_advice("tiny") == "run %env KD_PRESET=tiny in a cell"


def test_flag_abbreviations_are_refused(tmp_path, monkeypatch, capsys):
    """argparse would read --epoch as --epochs; a typo must not silently become another flag."""
    monkeypatch.setattr(sys, "argv", ["04_train.py", "--out", str(tmp_path), "--epoch", "2"])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "04_train.py"), run_name="__main__")
    assert e.value.code == 2 and "unrecognized arguments: --epoch 2" in capsys.readouterr().err


# --- training stops cleanly: NaN, Ctrl-C ---

def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(course_copy):
    before = digests(course_copy)
    r = run_here(["04_train.py", "--out", str(course_copy), "--preset", "tiny", "--lr", "1e30", "--warmup-steps", "0"])
    check_refused(r, "loss became nan", "--lr", code=1)
    assert digests(course_copy) == before


@pytest.mark.slow
def test_ctrl_c_saves_a_resumable_state(start_copy):
    from test_train import keep_train_samples
    keep_train_samples(start_copy, 128, n_val=8)  # 8 steps of 16: Ctrl-C at the 3rd
    before = digests(start_copy)
    p = subprocess.Popen([sys.executable, "04_train.py", "--out", str(start_copy), "--preset", "tiny",
                          "--log-interval", "1", "--epochs", "1", "--batch-size", "16"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in p.stdout:
        if line.startswith("step    3/"):
            p.send_signal(signal.SIGINT)
            break
    out, err = p.communicate(timeout=600)
    assert p.returncode == 1 and "Traceback" not in err
    assert "interrupted at step" in err and "--resume" in err
    state = load_artifact(str(start_copy / "train_state.pt"), "train_state")
    assert state["step"] >= 3
    after = digests(start_copy)
    def others(d):
        return {k: v for k, v in d.items() if k != "train_state.pt"}
    assert others(after) == others(before) and after["train_state.pt"] != before.get("train_state.pt")
    r = run_here(["04_train.py", "--out", str(start_copy), "--preset", "tiny", "--resume", "--epochs", "1",
                  "--batch-size", "16"])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr


CTRL_C_MID_SAVE = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
from common.plumbing.artifacts import run_lesson, save_artifact
real_save = torch.save
def save_then_ctrl_c(obj, f):
    real_save(obj, f)
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives before the file is flushed and renamed
    print("still saving", flush=True)
torch.save = save_then_ctrl_c
run_lesson(lambda: save_artifact({{"kind": "eval", "perplexity": {{"new": 1}}}}, {path!r}))
print("not reached")
"""


def test_ctrl_c_during_a_save_finishes_the_save_then_stops_in_one_line(course_copy):
    path = course_copy / "eval.pt"
    r = run_py(["-c", CTRL_C_MID_SAVE.format(root=ROOT, path=str(path))])
    assert r.returncode == 130 and "still saving" in r.stdout and "not reached" not in r.stdout
    assert r.stderr.strip() == "interrupted (files already written are intact)"
    assert load_artifact(str(path), "eval")["perplexity"] == {"new": 1}  # the save completed
    assert not [f for f in os.listdir(course_copy) if ".tmp-" in f]


# --- a write killed half way leaves the old file whole ---

SLOW_WRITER = """
import sys, time, torch
sys.path.insert(0, {root!r})
from common.plumbing.artifacts import save_artifact
real_save = torch.save
def slow_save(obj, f):
    f.write(b"half a checkpoint" * 1000)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
torch.save = slow_save
save_artifact({{"kind": "eval", "perplexity": {{}}}}, {path!r})
"""


def test_sigkill_during_a_write_leaves_the_old_file(course_copy):
    path = course_copy / "eval.pt"
    old = path.read_bytes()
    p = subprocess.Popen([sys.executable, "-c", SLOW_WRITER.format(root=ROOT, path=str(path))],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert path.read_bytes() == old
    assert load_artifact(str(path), "eval")["perplexity"]


def test_out_of_memory_is_answered_with_a_suggestion(course_copy, monkeypatch, capsys):
    """A GPU running out of memory (simulated: the CPU has no such limit) ends in advice, not a traceback."""
    from torch.nn import functional as F
    real_ce, calls = F.cross_entropy, []

    def ce_that_runs_out(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # the second training step: val before training was the first call
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_ce(*a, **k)

    before = digests(course_copy)
    monkeypatch.setattr(F, "cross_entropy", ce_that_runs_out)
    monkeypatch.setattr(sys, "argv", ["04_train.py", "--out", str(course_copy), "--preset", "tiny"])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "04_train.py"), run_name="__main__")
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "ran out of memory" in err and "--batch-size 2 --grad-accum 2" in err and "Traceback" not in err  # tiny: 4 x 1
    assert digests(course_copy) == before


def test_an_unfinished_run_never_replaces_the_finished_student(course_copy):
    """Stopped after its first epoch (which had a new best), a run leaves the earlier student.pt alone;
    the best is carried in train_state.pt and written when the resumed run finishes."""
    from test_train import keep_train_samples
    keep_train_samples(course_copy, 32)
    per_epoch = 8  # 32 samples, batch 4
    before = digests(course_copy)
    flags = ["04_train.py", "--out", str(course_copy), "--preset", "tiny", "--epochs", "2", "--lr", "1e-3"]
    r = run_here(flags + ["--stop-after", str(per_epoch + 1)])
    assert r.returncode == 0 and "epoch 1 | val loss" in r.stdout, r.stderr
    after = digests(course_copy)
    assert after["student.pt"] == before["student.pt"] and after["train_state.pt"] != before["train_state.pt"]
    assert load_artifact(str(course_copy / "train_state.pt"), "train_state")["best"]["step"] == per_epoch
    r = run_here(flags + ["--resume"])
    assert r.returncode == 0, r.stderr
    assert digests(course_copy)["student.pt"] != before["student.pt"]
    assert load_artifact(str(course_copy / "student.pt"), "student")["step"] in (per_epoch, 2 * per_epoch)
