"""Training: the losses, the AMP pieces, resume, and torchrun, on tiny models and the tiny course."""
import os
import platform
import sys

import pytest
import torch
from torch.nn import functional as F

from common.artifacts import load_artifact
from common.device import autocast, fused_adamw, keep_freed_memory, needs_scaler, pick_dtype
from common.distill import distill_loss, make_batch, soft_kd_loss
from common.model import GPT, GPTConfig
from conftest import run_py


def small(vocab=64):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=vocab, n_layer=2, n_head=2, n_embd=32))


def batch(vocab=64, B=4, T=16, seed=0):
    return torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(seed))


def test_one_step_lowers_the_loss_and_a_batch_can_be_overfit():
    m = small()
    x = batch()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        _, loss = m(x[:, :-1], x[:, 1:])
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[1] < losses[0]
    assert losses[0] > 4.0 and losses[-1] < 0.1  # from ~ln(64) to memorised


def test_soft_kd_loss_is_hintons_formula():
    torch.manual_seed(0)
    B, L, V, T = 2, 5, 11, 2.5
    student, teacher = torch.randn(B, L, V), torch.randn(B, L, V) * 2
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    # with all V tokens stored, the renormalised top-K is the whole distribution: the exact KL
    lp, ids = torch.topk(F.log_softmax(teacher, -1), V, -1)
    got = soft_kd_loss(student, ids, lp, mask, T)
    kl = F.kl_div(F.log_softmax(student / T, -1), F.softmax(teacher / T, -1), reduction="none").sum(-1)
    assert got.item() == pytest.approx((T * T * kl[mask].mean()).item(), rel=1e-5)
    # with K < V, the teacher is renormalised over its top K, the student is read at those ids
    K = 3
    lp, ids = torch.topk(F.log_softmax(teacher, -1), K, -1)
    p = F.softmax(lp / T, -1)                                  # teacher over its top K at temperature T
    log_q = F.log_softmax(student / T, -1).gather(-1, ids)      # student, full vocabulary, at those ids
    want = (T * T * (p * (p.log() - log_q)).sum(-1))[mask].mean()
    assert soft_kd_loss(student, ids, lp, mask, T).item() == pytest.approx(want.item(), rel=1e-5)
    assert soft_kd_loss(student, ids, lp, mask, T).item() > 0


def test_alpha_zero_is_plain_cross_entropy_and_alpha_one_is_pure_kd():
    m = small()
    seqs = [batch(B=1, T=n, seed=n)[0] for n in (9, 14, 5)]
    teacher = small()
    topk = []
    for s in seqs:
        with torch.no_grad():
            lp, ids = torch.topk(F.log_softmax(teacher(s[None, :-1])[0][0], -1), 8, -1)
        topk.append((ids.int(), lp.half()))
    x, y, ids, lps = make_batch(seqs, [a for a, _ in topk], [b for _, b in topk])
    assert (y == -100).sum() == (14 - 9) + (14 - 5)  # the two shorter rows are padded
    logits, ce = m(x, y)
    direct_ce = sum(F.cross_entropy(m(s[None, :-1])[0][0], s[1:], reduction="sum") for s in seqs) / (9 + 14 + 5)
    assert ce.item() == pytest.approx(direct_ce.item(), rel=1e-5)  # padding excluded from the loss
    assert distill_loss(logits, ce, y, ids, lps, alpha=0.0).item() == pytest.approx(ce.item(), rel=1e-6)
    pure = soft_kd_loss(logits, ids, lps, y != -100, T=2.0)
    assert distill_loss(logits, ce, y, ids, lps, alpha=1.0, T=2.0).item() == pytest.approx(pure.item(), rel=1e-6)


def test_precision_choice_and_bf16_autocast_on_cpu():
    assert pick_dtype("cpu") == "fp32"
    assert pick_dtype("cuda", "fp16") == "fp16" and needs_scaler("fp16")
    assert not needs_scaler("bf16") and not needs_scaler("fp32")
    if torch.cuda.is_available():
        assert pick_dtype("cuda") == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    m = small()
    x = batch()
    with autocast("cpu", "bf16"):
        logits, loss = m(x[:, :-1], x[:, 1:])
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_fused_adamw_makes_the_same_updates_as_the_loop():
    assert fused_adamw("cpu") == (tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4))
    if not fused_adamw("cpu"):
        pytest.skip("fused AdamW on the CPU needs torch 2.4")
    models, start = [small(), small()], list(small().parameters())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.5, fused=f) for m, f in zip(models, (False, True))]
    for step in range(5):
        x = batch(seed=step)
        for m, opt in zip(models, opts):
            _, loss = m(x[:, :-1], x[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for a, b, a0 in zip(*(m.parameters() for m in models), start):
        assert (a - a0).abs().max() > 0.04      # five steps of lr 1e-2 moved every tensor
        assert (a - b).abs().max() < 1e-4       # float rounding apart, the same place


def test_keep_freed_memory_takes_on_linux_and_training_still_works():
    linux_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() == linux_glibc
    big = torch.ones(64, 2 ** 20)  # 256 MB: served from the heap now, not from a fresh mapping
    assert float(big.sum()) == 64 * 2 ** 20
    del big
    test_one_step_lowers_the_loss_and_a_batch_can_be_overfit()


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_scales_unscales_and_skips_overflowing_steps(fused):
    if fused and not fused_adamw("cpu"):
        pytest.skip("fused AdamW on the CPU needs torch 2.4")
    m = small()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=fused)  # 04_train.py uses the fused one where it can
    scaler = torch.amp.GradScaler("cpu", enabled=needs_scaler("fp16"), init_scale=2.0 ** 10)
    x = batch()
    _, loss = m(x[:, :-1], x[:, 1:])
    scaler.scale(loss).backward()
    scaled = m.lm_head.weight.grad.clone()
    scaler.unscale_(opt)
    assert torch.allclose(m.lm_head.weight.grad * 2 ** 10, scaled)  # true gradients again before clipping
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 10
    before = m.lm_head.weight.detach().clone()
    opt.zero_grad()
    _, loss = m(x[:, :-1], x[:, 1:])
    scaler.scale(loss * float("inf")).backward()  # an overflow: the step is skipped and the scale halved
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert torch.equal(m.lm_head.weight, before) and scaler.get_scale() == 2.0 ** 9


def weights(path):
    return load_artifact(str(path), "student")["model"]


def test_lessons_03_04_train_the_tiny_student(course):
    out, _ = course
    log = load_artifact(str(out / "train_log.pt"), "train_log")
    first, last = log["val"][0][1], log["val"][-1][1]
    assert first > 10.5 and last < first - 1.5, log["val"]  # from ~ln(50257) to clearly lower
    assert len(log["loss"]) == len(log["lr"]) == log["step"][-1]


@pytest.mark.parametrize("flags", [["--kd", "soft"], ["--dtype", "bf16"], ["--dtype", "fp16"]])
def test_soft_kd_and_cpu_autocast_train_the_tiny_student(course_copy, flags):
    r = run_py(["04_train.py", "--preset", "tiny", "--out", str(course_copy), "--epochs", "2", *flags])
    assert r.returncode == 0, r.stderr
    assert ("GradScaler" in r.stdout) == ("fp16" in flags)
    log = load_artifact(str(course_copy / "train_log.pt"), "train_log")
    assert log["val"][-1][1] < log["val"][0][1] - 0.5


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(course_copy):
    common = ["04_train.py", "--preset", "tiny", "--out", str(course_copy), "--epochs", "1", "--dropout", "0.1"]
    r = run_py(common)
    assert r.returncode == 0, r.stderr
    straight = weights(course_copy / "student_last.pt")
    r = run_py(common + ["--stop-after", "4"])
    assert r.returncode == 0 and "--resume" in r.stdout, r.stderr
    r = run_py(common + ["--resume"])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    resumed = weights(course_copy / "student_last.pt")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_torchrun_two_cpu_processes(course_copy):
    for f in ("student.pt", "train_log.pt"):
        os.remove(course_copy / f)
    r = run_py(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "04_train.py",
                "--preset", "tiny", "--out", str(course_copy), "--epochs", "2"], env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("trained in") == 1 and "2 process(es)" in r.stdout  # only rank 0 speaks
    log = load_artifact(str(course_copy / "train_log.pt"), "train_log")
    assert log["world"] == 2 and log["val"][-1][1] < log["val"][0][1]
    assert not [f for f in os.listdir(course_copy) if ".tmp-" in f]
