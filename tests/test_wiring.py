"""Where values travel: each flag's non-default value reaches the object that uses it (two flags with
equal defaults swapped pass every test run at the defaults), each step reads the data it should."""
import sys

import pytest

from common.distill import FLAGS, KD
from conftest import load_lesson

L04 = load_lesson("04_train.py")

# a value for each of KD's flags, each unlike its default and unlike the others
NON_DEFAULT = {"--kd": "jsd", "--kd-alpha": "0.3", "--kd-temperature": "1.5", "--jsd-beta": "0.7",
               "--soft-tail": "rest", "--soft-k": "5", "--skew": "0.2", "--entropy-threshold": "2.5"}


def test_each_distillation_flag_reaches_its_field_of_kd(monkeypatch):
    """04's flags at values unlike their defaults and unlike each other: KD.from_args (04) and
    KD.from_flags (07's method lists) put each in its own field (fails with --kd-alpha and --jsd-beta
    swapped, equal at their defaults of 0.5, or a flag left at its default)."""
    assert set(NON_DEFAULT) == set(FLAGS)  # a new flag needs a value here
    flags = [x for pair in NON_DEFAULT.items() for x in pair]
    monkeypatch.setattr(sys, "argv", ["04_train.py", "--preset", "tiny", *flags])
    monkeypatch.setattr(L04, "refuse_misfits", lambda args: None)  # these values do not fit together
    for kd in (KD.from_args(L04.get_args()), KD.from_flags(flags)):
        for flag, field in FLAGS.items():
            default = getattr(KD(), field)
            assert getattr(kd, field) == type(default)(NON_DEFAULT[flag]) != default, flag


def test_04s_training_flags_reach_the_step_the_schedule_and_the_students_sampling(start_copy, monkeypatch):
    """One epoch of 04 at non-default --grad-clip, --min-lr-ratio, --warmup and --on-policy-temperature:
    clip_grad_norm_ gets that norm at every step, the student samples at that temperature, and the logged
    learning rates follow lr_at with that floor and warmup (fails with any of them left at its default,
    whose value the other tests run at)."""
    import torch

    import common.sampling
    from common.plumbing.artifacts import load_artifact
    from conftest import run_here
    seen = {"max_norm": set(), "temperature": set()}
    clip, sample = torch.nn.utils.clip_grad_norm_, common.sampling.continue_each

    def clip_and_see(params, max_norm, *a, **k):
        seen["max_norm"].add(max_norm)
        return clip(params, max_norm, *a, **k)

    def sample_and_see(model, prompts, n_new, eos, temperature, *a, **k):
        seen["temperature"].add(temperature)
        return sample(model, prompts, n_new, eos, temperature, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_see)
    monkeypatch.setattr(common.sampling, "continue_each", sample_and_see)
    r = run_here(["04_train.py", "--preset", "tiny", "--out", str(start_copy), "--epochs", "1", "--kd", "rkl",
                  "--on-policy", "0.5", "--on-policy-temperature", "0.7", "--grad-clip", "0.25",
                  "--min-lr-ratio", "0.3", "--warmup-steps", "3", "--log-interval", "1"])
    assert r.returncode == 0, r.stderr
    assert seen == {"max_norm": {0.25}, "temperature": {0.7}}
    log = load_artifact(str(start_copy / "train_log.pt"), "train_log")
    lr, total = log["settings"]["lr"], log["steps_per_epoch"]  # one epoch
    want = [L04.lr_at(step - 1, total, 3, lr, lr * 0.3) for step in log["step"]]
    assert log["lr"] == [pytest.approx(x, rel=1e-6) for x in want]
    assert log["lr"][2] == pytest.approx(lr) and log["lr"][-1] == pytest.approx(lr * 0.3, rel=0.01)
