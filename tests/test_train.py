"""Training: the losses, the AMP pieces, resume, and torchrun, on tiny models and the tiny course."""
import math
import multiprocessing
import os
import platform
import sys

import pytest
import torch
from torch.nn import functional as F

from common.data import make_batch
from common.distill import KD, soft_kd_loss, token_divergence
from common.model import GPT, GPTConfig, fused_adamw, logits_fp32
from common.plumbing.artifacts import load_artifact, model_checkpoint, save_artifact
from common.plumbing.device import Precision, keep_freed_memory, needs_scaler, pick_dtype
from common.sampling import sampled_cache
from conftest import load_lesson, run_here, run_py, run_ranks

L04 = load_lesson("04_train.py")


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


def mixed_samples(n=8, vocab=64, teacher=None, K=8):
    """n samples of different lengths, each with a prompt of 1-4 tokens, and a teacher's top-K for them."""
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, vocab, (int(torch.randint(6, 17, (1,), generator=g)),), generator=g) for _ in range(n)]
    prompts = [int(torch.randint(1, 5, (1,), generator=g)) for _ in range(n)]
    teacher = teacher or small(vocab)
    topk = []
    for s in seqs:
        with torch.no_grad():
            lp, ids = torch.topk(F.log_softmax(teacher(s[None, :-1])[0][0], -1), K, -1)
        topk.append((ids.int(), lp.half()))
    return seqs, prompts, topk


def test_loss_sums_score_sampled_tokens_only_and_alpha_mixes_ce_and_kl():
    m = small()
    seqs, P, topk = mixed_samples(3)
    x, y, ids, lps = make_batch(seqs, [a for a, _ in topk], [b for _, b in topk], prompt_lens=P)
    assert int((y != -100).sum()) == sum(len(s) - p for s, p in zip(seqs, P))  # sampled tokens, <|endoftext|> too
    logits, _ = m(x)
    loss, ce = L04.loss_sums(logits, y, KD("seq"))
    direct = sum(F.cross_entropy(m(s[None, :-1])[0][0][p - 1:], s[p:], reduction="sum") for s, p in zip(seqs, P))
    assert loss is ce and ce.item() == pytest.approx(direct.item(), rel=1e-5)
    mask = y != -100
    for alpha in (0.0, 0.3, 1.0):
        loss, ce2 = L04.loss_sums(logits, y, KD("soft", alpha=alpha, T=2.0), (ids, lps))
        kl_mean = soft_kd_loss(logits, ids, lps, mask, T=2.0)  # T^2 * KL, averaged
        want = alpha * kl_mean * mask.sum() + (1 - alpha) * ce
        assert ce2.item() == pytest.approx(ce.item()) and loss.item() == pytest.approx(want.item(), rel=1e-5)
    # online: the divergence to the teacher's full distribution, summed over the sampled positions only
    teacher_logits = small()(x)[0] * 2
    for kind in ("fkl", "rkl", "jsd"):
        loss, _ = L04.loss_sums(logits, y, KD(kind, beta=0.3), teacher_logits=teacher_logits)
        want = token_divergence(logits, teacher_logits, kind, beta=0.3)[mask].sum()
        assert loss.item() == pytest.approx(want.item(), rel=1e-6) and loss.item() > 0


def other_teacher(dtype=torch.float64):
    """A model like the student with other weights, as the online teacher."""
    torch.manual_seed(5)
    return GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)).to(dtype).eval()


def one_step_change(splits, kd="seq", dtype=torch.float64, grad_clip=1e9, scaler=None, seqs=None, train_dtype="fp32"):
    """Weights after one train_step with plain SGD (lr 1) minus before: minus the (clipped) gradient."""
    teacher = other_teacher(dtype) if kd in L04.ONLINE else None
    if seqs is None:
        seqs, P, topk = mixed_samples(8)
    m = small().to(dtype)
    before = [p.detach().clone() for p in m.parameters()]
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    micro, size = [], len(seqs) // splits
    for i in range(0, len(seqs), size):
        x, y, ids, lps = make_batch(seqs[i:i + size], [a for a, _ in topk[i:i + size]], [b for _, b in topk[i:i + size]],
                                    prompt_lens=P[i:i + size])
        micro.append((x, y, (ids, lps) if kd == "soft" else None))
    step_tokens = sum(len(s) - p for s, p in zip(seqs, P))
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    setup = L04.Setup(Precision("cpu", train_dtype), KD(kd, beta=0.3), teacher, grad_clip)
    L04.train_step(m, opt, scaler, micro, step_tokens, setup)
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(m.parameters(), before)])


@pytest.mark.parametrize("kd", ["seq", "soft", "fkl", "rkl", "jsd", "tvd", "skl", "akl", "eopd", "rkl-sampled",
                                "rkl-vopd"])
def test_a_steps_gradient_does_not_depend_on_its_micro_batch_split(kd):
    """8 samples of different lengths as 1x8, 2x4 or 8x1: the same mean over the step's tokens."""
    whole = one_step_change(1, kd)
    assert whole.abs().max() > 1e-3
    if kd in ("fkl", "rkl", "jsd", "tvd"):  # and minus the gradient of the divergence, teacher and student on x
        seqs, P, _ = mixed_samples(8)
        m, teacher = small().double(), other_teacher()
        x, y = make_batch(seqs, prompt_lens=P)
        loss = token_divergence(m(x)[0], logits_fp32(teacher, x), kd, beta=0.3)[y != -100].sum() / int((y != -100).sum())
        loss.backward()
        assert torch.allclose(whole, -torch.cat([p.grad.flatten() for p in m.parameters()]), rtol=1e-6, atol=1e-12)
    for splits in (2, 8):
        assert torch.allclose(one_step_change(splits, kd), whole, rtol=1e-6, atol=1e-12), splits


def test_clipping_happens_on_true_gradients_under_a_grad_scaler():
    """With fp16's loss scaling (2^16 here) the gradient is unscaled before it is clipped: the applied
    update is the clipped gradient, of norm grad_clip in true units (not grad_clip / 2^16)."""
    free = one_step_change(1, dtype=torch.float32).norm()
    assert free > 0.05  # so a clip at 0.01 bites
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    clipped = one_step_change(1, dtype=torch.float32, grad_clip=0.01, scaler=scaler)
    assert clipped.norm().item() == pytest.approx(0.01, rel=1e-4)


def test_learning_rate_schedule_warms_up_then_decays_by_cosine():
    lr_at = L04.lr_at
    total, warmup, lr, low = 100, 10, 1.0, 0.1
    assert lr_at(0, total, warmup, lr, low) == pytest.approx(0.1)          # 1/10 of the way up
    assert lr_at(9, total, warmup, lr, low) == pytest.approx(1.0)          # warmup - 1: at the peak
    assert lr_at(10, total, warmup, lr, low) == pytest.approx(1.0)         # cosine starts at the peak
    assert lr_at(55, total, warmup, lr, low) == pytest.approx(0.55)        # half way: (lr + min_lr) / 2
    assert lr_at(99, total, warmup, lr, low) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_at(100, total, warmup, lr, low) == pytest.approx(0.1)        # the end: min_lr


def test_precision_choice_and_bf16_autocast_on_cpu():
    assert pick_dtype("cpu") == "fp32"
    assert pick_dtype("cuda", "fp16") == "fp16" and needs_scaler("fp16")
    assert not needs_scaler("bf16") and not needs_scaler("fp32")
    # the auto choice on a GPU: tests/test_gpu.py, with a mocked T4, V100, A100 and H100
    m = small()
    x = batch()
    with Precision("cpu", "bf16").autocast():
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
    out, _, _ = course
    log = load_artifact(str(out / "train_log.pt"), "train_log")
    first, last = log["val"][0][1], log["val"][-1][1]
    assert first > 10.5 and last < first - 1.5, log["val"]  # from ~ln(50257) to clearly lower
    assert len(log["loss"]) == len(log["lr"]) == log["step"][-1]


@pytest.mark.slow
def test_cpu_autocast_bf16_trains_the_tiny_student(start_copy):
    """bf16 autocast on a CPU (no GradScaler). Soft, fkl, rkl, jsd and on-policy training: test_methods.py;
    fp16 with a GradScaler: the resume test."""
    keep_train_samples(start_copy, 16, n_val=8)  # 8 steps: bf16 matmuls are slow on a CPU
    r = run_here(["04_train.py", "--preset", "tiny", "--out", str(start_copy), "--epochs", "2", "--dtype", "bf16"])
    assert r.returncode == 0, r.stderr
    assert "GradScaler" not in r.stdout and "cpu bf16" in r.stdout
    log = load_artifact(str(start_copy / "train_log.pt"), "train_log")
    assert log["val"][-1][1] < log["val"][0][1] - 0.5


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def train(out, *flags, torchrun=False, ranks=False, threads=None):
    """Run lesson 04 on the tiny preset: in this process (without a Python and torch start-up), on
    `threads` threads if given; under torchrun, as 2 CPU processes of one thread each; with ranks,
    as those 2 processes forked from a fork server (run_ranks: no start-ups; torchrun where there is
    no fork server)."""
    args = ["04_train.py", "--preset", "tiny", "--out", str(out), *flags]
    if torchrun or (ranks and "forkserver" not in multiprocessing.get_all_start_methods()):
        r = run_py([*TORCHRUN, *args], env={"OMP_NUM_THREADS": "1"})
    elif ranks:
        r = run_ranks(args)
    else:
        r = run_here(args, threads=threads)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def keep_train_samples(out, n, n_val=None, n_test=None):
    """Cut generated.pt's train split to its first n samples (and val to n_val, test to n_test): fewer
    steps, the same code paths."""
    gen = load_artifact(str(out / "generated.pt"), "generated")
    for split, keep in (("train", n), ("val", n_val), ("test", n_test)):
        for key in (split, f"{split}_prompt_lens", f"{split}_texts", f"{split}_topk_ids", f"{split}_topk_logprobs"):
            gen[key] = gen[key][:keep]
    save_artifact(gen, str(out / "generated.pt"))


def finished(out):
    """What an exact resume must reproduce: the last weights, the optimizer's and scaler's state, the log."""
    st = load_artifact(str(out / "train_state.pt"), "train_state")
    return weights(out / "student_last.pt"), st["optimizer"]["state"], st["scaler"], st["history"]


def assert_same_run(a, b):
    (wa, oa, sa, ha), (wb, ob, sb, hb) = a, b
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    assert sa == sb and ha["loss"] == hb["loss"] and ha["val"] == hb["val"]


@pytest.mark.slow
def test_resume_in_three_parts_with_fp16_across_an_epoch_boundary_is_exact(start_copy):
    """fp16 with a GradScaler (its growth counter must come back too), stopped in epoch 1, then again
    after crossing into epoch 2, then finished: the same run as one without stops, and its wall time
    covers every part. A changed training flag is refused, naming it."""
    keep_train_samples(start_copy, 8, n_val=2)  # 2 steps an epoch: fp16 matmuls are ~40x slower on a CPU
    flags = ["--epochs", "2", "--dtype", "fp16", "--dropout", "0.1"]
    assert "GradScaler" in train(start_copy, *flags).stdout
    straight = finished(start_copy)
    per_epoch = load_artifact(str(start_copy / "train_log.pt"), "train_log")["steps_per_epoch"]
    assert per_epoch == 2
    train(start_copy, *flags, "--stop-after", "1")
    r = run_here(["04_train.py", "--preset", "tiny", "--out", str(start_copy), *flags, "--resume", "--grad-clip", "0.5"])
    assert r.returncode == 1 and "grad_clip" in r.stderr and "--grad-clip 1.0" in r.stderr, r.stderr
    r = train(start_copy, *flags, "--resume", "--stop-after", "2")              # into epoch 2
    assert (f"stopped after 2 steps as asked (--stop-after); wrote {start_copy}/train_state.pt; continue "
            f"with --resume\n") in r.stdout  # this run's 2 steps (3 in all)
    part2 = load_artifact(str(start_copy / "train_state.pt"), "train_state")
    assert part2["step"] == 3 and part2["wall_time"] > 0
    r = train(start_copy, *flags, "--resume", "--log-interval", "1")           # may change: cannot change the result
    assert f"resumed from {start_copy}/train_state.pt at step 3/4" in r.stdout
    assert_same_run(finished(start_copy), straight)
    assert load_artifact(str(start_copy / "train_log.pt"), "train_log")["wall_time"] > part2["wall_time"]


def test_a_fresh_run_keeps_an_unfinished_state_as_prev(start_copy):
    train(start_copy, "--epochs", "1", "--stop-after", "2")
    unfinished = (start_copy / "train_state.pt").read_bytes()
    r = train(start_copy, "--epochs", "1", "--stop-after", "1")
    assert "kept as train_state.prev.pt" in r.stdout
    assert (start_copy / "train_state.prev.pt").read_bytes() == unfinished


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process_accumulating_two(start_copy):
    """2 processes x 2 micro-batches = 1 process x 4 micro-batches: the same global batches, the same
    token-mean loss, so the same weights. Pins the rank split (each rank its own batches), the
    accumulation normalisation, and no_sync (gradients cross between processes once per step). With
    --kd tvd: the teacher online, in each process, normalised like every kind (the split within a
    process is tested for each kind in test_a_steps_gradient_does_not_depend_on_its_micro_batch_split)."""
    keep_train_samples(start_copy, 32, n_val=8)  # 8 micro-batches of 4: 2 whole steps in both layouts
    bs = 4
    # one thread each, as the torchrun processes: another thread count rounds sums differently, and
    # Adam's g / sqrt(v) turns those last-bit differences on near-zero gradients into visible ones
    train(start_copy, "--kd", "tvd", "--epochs", "1", "--batch-size", str(bs), "--grad-accum", "4", threads=1)
    one = weights(start_copy / "student_last.pt")
    one_losses = load_artifact(str(start_copy / "train_log.pt"), "train_log")["loss"]
    r = train(start_copy, "--kd", "tvd", "--epochs", "1", "--batch-size", str(bs), "--grad-accum", "2", ranks=True)
    if hasattr(r, "others"):  # rank 0 speaks for both: the other rank prints nothing
        assert "val before training" in r.stdout and r.others == [""], r.others
    assert r.stdout.count("trained in") == 1 and "2 process(es)" in r.stdout  # only rank 0 speaks
    log = load_artifact(str(start_copy / "train_log.pt"), "train_log")
    assert log["world"] == 2 and log["allreduces_per_step"] == 1
    assert log["loss"] == pytest.approx(one_losses, rel=1e-7)  # each step's token-mean loss
    # the weights agree to ~1e-5 (sums in another order; Adam's g / sqrt(v) magnifies the last bits of
    # near-zero gradients); a wrong split or normalisation moves them by about a step, lr = 1e-2
    two = weights(start_copy / "student_last.pt")
    assert all(torch.allclose(one[k], two[k], rtol=0, atol=1e-4) for k in one)
    assert not [f for f in os.listdir(start_copy) if ".tmp-" in f]


@pytest.mark.slow
def test_torchrun_resume_with_dropout_is_exact(start_copy):
    """Each process saves and restores its own random stream (the dropout masks differ per rank)."""
    keep_train_samples(start_copy, 48, n_val=8)  # 6 steps of 2 x 4 samples
    flags = ["--epochs", "1", "--dropout", "0.1"]
    train(start_copy, *flags, ranks=True)
    straight = finished(start_copy)
    train(start_copy, *flags, "--stop-after", "3", ranks=True)
    assert len(load_artifact(str(start_copy / "train_state.pt"), "train_state")["rng"]) == 2
    train(start_copy, *flags, "--resume", ranks=True)
    assert_same_run(finished(start_copy), straight)
    # the resumed part's 3 steps crossed processes 3 times: per step of this run, not of all 6
    assert load_artifact(str(start_copy / "train_log.pt"), "train_log")["allreduces_per_step"] == 1


def test_torchrun_ranks_draw_different_dropout_masks(start_copy):
    """Two ranks seeded alike would drop the same units on every step, a correlation no one-process
    run has. Both ranks train on copies of one sample, so they draw alike in number and shape: their
    random streams end equal if and only if they were seeded alike."""
    keep_train_samples(start_copy, 8, n_val=2)
    gen = load_artifact(str(start_copy / "generated.pt"), "generated")
    for key in ("train", "train_prompt_lens", "train_texts", "train_topk_ids", "train_topk_logprobs"):
        gen[key] = [gen[key][0]] * 8
    save_artifact(gen, str(start_copy / "generated.pt"))
    train(start_copy, "--epochs", "1", "--dropout", "0.1", ranks=True)
    rng = load_artifact(str(start_copy / "train_state.pt"), "train_state")["rng"]
    assert not torch.equal(rng[0]["cpu"], rng[1]["cpu"])


def captured_run(out, monkeypatch, *flags):
    """Run lesson 04 in this process and record each optimizer step's micro-batches (x, y) as trained on."""
    steps = []
    real = L04.train_step

    def recording(model, optimizer, scaler, micro, *args, **kw):
        steps.append([(x.clone(), y.clone()) for x, y, _ in micro])
        return real(model, optimizer, scaler, micro, *args, **kw)
    monkeypatch.setattr(L04, "train_step", recording)
    monkeypatch.setattr(sys, "argv", ["04_train.py", "--preset", "tiny", "--out", str(out), *flags])
    L04.main()
    return steps, load_artifact(str(out / "train_log.pt"), "train_log")


def step_divergence(student, teacher, batches, kind):
    """An independent step loss: the divergence summed over the scored targets, over their count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            d = token_divergence(student(x)[0], teacher(x)[0], kind)
            total += d[y != -100].double().sum().item()
            count += int((y != -100).sum())
    return total / count


def test_on_policy_0_trains_on_the_teachers_samples_in_the_seeded_order(start_copy, monkeypatch):
    """--on-policy 0: every step is the offline run's: the teacher's samples, in the order of the
    seeded shuffle, and the first step's loss is the reverse KL of the untrained student on them."""
    keep_train_samples(start_copy, 8, n_val=2)
    steps, log = captured_run(start_copy, monkeypatch, "--kd", "rkl", "--on-policy", "0", "--epochs", "2")
    gen = load_artifact(str(start_copy / "generated.pt"), "generated")
    for epoch in range(2):
        order = torch.randperm(8, generator=torch.Generator().manual_seed(1337 + epoch)).tolist()
        for i in range(2):
            idx = order[4 * i:4 * i + 4]
            x, y = make_batch([gen["train"][k] for k in idx], prompt_lens=[gen["train_prompt_lens"][k] for k in idx])
            (gx, gy), = steps[2 * epoch + i]
            assert torch.equal(gx, x) and torch.equal(gy, y)
    student = load_artifact(str(start_copy / "student_init.pt"), "student_init")
    teacher = load_artifact(str(start_copy / "teacher.pt"), "teacher")
    s, t = (GPT(GPTConfig.from_dict(c["config"])) for c in (student, teacher))
    s.load_state_dict(student["model"])
    t.load_state_dict(teacher["model"])
    assert log["loss"][0] == pytest.approx(step_divergence(s.eval(), t.eval(), steps[0], "rkl"), rel=1e-5)
    # what the run's compute is counted from: 2 epochs of every sample's positions, none sampled
    assert log["student_tokens"] == 2 * sum(len(seq) - 1 for seq in gen["train"]) and log["sampled_tokens"] == 0
    assert log["tokens"] == 2 * sum(len(seq) - P for seq, P in zip(gen["train"], gen["train_prompt_lens"]))


def student_that_writes(targets, block_size=128, n_embd=32):
    """A student whose greedy next token after position t is targets[t], whatever came before: its
    blocks add nothing (their output projections are zero), each token id it writes has its own
    channel (its embedding row e_j; every other row is zero: logit 0), and position t's embedding
    is 100 e_j for j = that of targets[t]. So the final hidden state points at targets[t] with a
    margin of ~5 in its logits: the same text on any CPU, whatever its rounding."""
    s = GPT(GPTConfig(block_size=block_size, vocab_size=50257, n_layer=1, n_head=2, n_embd=n_embd))
    channel = {tok: j for j, tok in enumerate(dict.fromkeys(targets))}
    assert len(channel) <= n_embd
    with torch.no_grad():
        for name, p in s.named_parameters():
            if "c_proj" in name or name.startswith("transformer.w"):
                p.zero_()
        for tok, j in channel.items():
            s.transformer.wte.weight[tok, j] = 1.0
        for t, tok in enumerate(targets):
            s.transformer.wpe.weight[t, channel[tok]] = 100.0
    return s.eval()


def test_on_policy_1_trains_on_the_students_own_text(start_copy, monkeypatch, capsys):
    """--on-policy 1 at temperature 0: step 1 trains on the student's own greedy continuation of each
    prompt (computed here without a KV cache), at most as long as the teacher's sample and shorter
    where it wrote <|endoftext|>, the prompt never scored; the step's loss is the reverse KL averaged
    over exactly those tokens (not over the teacher's sample lengths). The student is built to write
    a known text ending at a known position (student_that_writes): cut short in the longest sample
    of the first step, whatever the machine."""
    keep_train_samples(start_copy, 8, n_val=2)
    gen = load_artifact(str(start_copy / "generated.pt"), "generated")
    order = torch.randperm(8, generator=torch.Generator().manual_seed(1337)).tolist()
    end = max(len(gen["train"][k]) for k in order[:4]) - 3  # it writes <|endoftext|> after this
    words = [11, 13, 262, 257, 290]  # ",", ".", " the", " a", " and": a cycle of them, then the end
    s = student_that_writes([words[t % 5] for t in range(end)] + [50256] * (128 - end))
    save_artifact(model_checkpoint(s, "student", preset="tiny"), str(start_copy / "writer.pt"))
    steps, log = captured_run(start_copy, monkeypatch, "--kd", "rkl", "--on-policy", "1", "--init",
                              str(start_copy / "writer.pt"), "--on-policy-temperature", "0", "--epochs", "1",
                              "--log-interval", "1")
    logged = capsys.readouterr().out
    assert "student sampling" in logged and "| ppl on own text " in logged  # whose tokens
    (x, y), = steps[0]
    shorter = 0
    for row, k in enumerate(order[:4]):
        seq, P = gen["train"][k], gen["train_prompt_lens"][k]
        text = seq[:P].tolist()
        with torch.no_grad():
            while len(text) < len(seq) and (len(text) == P or text[-1] != 50256):
                text.append(int(s(torch.tensor([text]))[0][0, -1].argmax()))
        assert x[row, :P].tolist() == seq[:P].tolist()                 # the teacher's prompt, as context
        assert (y[row, :P - 1] == -100).all()                          # never a target
        assert y[row, P - 1:len(text) - 1].tolist() == text[P:]        # the student's own tokens are
        assert (y[row, len(text) - 1:] == -100).all()                  # and nothing after them
        assert text[P:] != seq[P:].tolist()
        shorter += len(text) < len(seq)
    assert shorter  # the student ended a text before the teacher's length: the token count differs
    teacher = load_artifact(str(start_copy / "teacher.pt"), "teacher")
    t = GPT(GPTConfig.from_dict(teacher["config"]))
    t.load_state_dict(teacher["model"])
    assert log["loss"][0] == pytest.approx(step_divergence(s, t.eval(), steps[0], "rkl"), rel=1e-5)
    # compute counts: the student ran through each prompt and the tokens it wrote, once to write them
    # (sampled_tokens) and once to train on them (student_tokens); scored: the tokens it wrote
    written = [(x[y != -100].numel(), y) for (x, y), in steps]
    assert log["tokens"] == sum(n for n, _ in written)
    prompts = sum(gen["train_prompt_lens"][k] - 1 for k in order)
    assert log["student_tokens"] == log["sampled_tokens"] == log["tokens"] + prompts


def test_student_samples_keep_the_endoftext_and_nothing_after():
    """A student that always says <|endoftext|>: each sample becomes its prompt plus that one token,
    which is scored; the positions after it are padding, never targets."""
    m = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():  # the final LayerNorm outputs e_0 everywhere; the tied head reads EOT's row: 100
        m.transformer.ln_f.weight.zero_()
        m.transformer.ln_f.bias.copy_(torch.eye(16)[0])
        m.transformer.wte.weight[50256, 0] = 100.0
    seqs = [torch.tensor([50256, 11, 12, 13, 14, 15]), torch.tensor([50256, 21, 22, 23])]
    out = L04.student_samples(m, seqs, [2, 1], temperature=0)
    assert [s.tolist() for s in out] == [[50256, 11, 50256], [50256, 50256]]
    assert m.training
    _, y = make_batch(out, prompt_lens=[2, 1])
    assert y.tolist() == [[-100, 50256], [50256, -100]]


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("kd", ["seq", "soft", "soft-rest", "soft-sampled", "fkl", "rkl", "jsd", "tvd", "skl",
                                "akl", "eopd", "rkl-sampled", "rkl-vopd"])
def test_the_loss_written_out_in_lesson_04_equals_the_loss_it_trains_on(kd, zeros):
    """04's loss_by_hand (each formula in plain code) against loss_sums (common/distill.py, log space),
    as the mean over the scored tokens, on a batch with prompt and padding positions; zeros: the
    teacher gives some tokens no probability at all (logit -inf, p = 0, where 0 log 0 must be 0).
    (The reverse KL is infinite there, on both sides: it is left out of that case.)"""
    if zeros and kd in ("rkl", "akl", "eopd", "rkl-sampled", "rkl-vopd"):
        pytest.skip("KL(q || p) is infinite where p = 0 and q > 0")
    torch.manual_seed(0)
    B, L, V, K = 3, 7, 50, 8
    logits, teacher = torch.randn(B, L, V) * 2, torch.randn(B, L, V) * 3
    if zeros:  # the teacher's 20 lowest tokens at every position: probability 0
        teacher = teacher.scatter(-1, teacher.topk(20, -1, largest=False).indices, -math.inf)
    y = torch.randint(0, V, (B, L))
    y[0, :2] = -100  # a prompt
    y[2, 5:] = -100  # padding
    lps, ids = torch.log_softmax(teacher, -1).topk(K, -1)
    topk = (ids.int(), lps.half())
    kd, T, tail = ("soft", 1.0, kd[5:]) if kd in ("soft-rest", "soft-sampled") else (kd, 2.5, "renorm")
    if tail == "sampled":  # 02's sampled cache: distinct ids and their counts, 16 draws
        ids, counts = sampled_cache(teacher.view(B * L, V), 16, torch.Generator().manual_seed(0))
        topk = (ids.view(B, L, -1), counts.view(B, L, -1))
    logits.requires_grad_()
    # entropy 2.0: the teacher's entropy at these positions lies on both sides of it
    kd = KD(kd, alpha=0.3, T=T, beta=0.7, tail=tail, skew=0.2, entropy=2.0)
    plain = L04.loss_by_hand(logits, y, kd, topk, teacher)
    total, _ = L04.loss_sums(logits, y, kd, topk, teacher)
    assert plain.item() == pytest.approx((total / (y != -100).sum()).item(), rel=1e-5)
    assert abs(plain.item()) > 1e-2
    # and the same gradient (for rkl-sampled the value and the gradient come from different terms)
    g_plain, = torch.autograd.grad(plain, logits)
    g_sums, = torch.autograd.grad(total / (y != -100).sum(), logits)
    assert torch.allclose(g_plain, g_sums, rtol=1e-4, atol=1e-7) and g_plain.abs().max() > 1e-4


def test_rkl_sampled_in_04_has_the_reverse_kls_gradient_in_expectation():
    """04's loss_sums for rkl-sampled (the teacher's log-prob of each sampled token, gathered from its
    logits), over many samples y ~ q at three positions with different teachers: the mean gradient is
    the exact reverse KL's (autograd) within 4 Monte Carlo standard errors; its value, the mean of
    log q(y) - log p(y), estimates the reverse KL. Fails with the teacher read at another position."""
    g = torch.Generator().manual_seed(1)
    L, N, V = 3, 100_000, 6
    s, t = torch.randn(1, L, V, generator=g), torch.randn(1, L, V, generator=g) * 2
    y = torch.multinomial(torch.softmax(s[0], -1), N, replacement=True, generator=g).T.contiguous()  # (N, L) y ~ q
    logits = s.expand(N, L, V).clone().requires_grad_()
    loss, _ = L04.loss_sums(logits, y, KD("rkl-sampled"), teacher_logits=t.expand(N, L, V))
    (loss / N).backward()
    exact = token_divergence(s, t, "rkl")
    assert (loss / N).item() == pytest.approx(exact.sum().item(), rel=0.02)
    s_ex = s.clone().requires_grad_()
    token_divergence(s_ex, t, "rkl").sum().backward()
    mc = logits.grad.sum(0)  # (L, V)
    per_draw = logits.grad * N  # each draw's gradient, for the Monte Carlo error
    se = per_draw.std(0) / math.sqrt(N)
    assert (s_ex.grad[0].abs() > 0.05).any()
    assert ((mc - s_ex.grad[0]).abs() <= 4 * se + 1e-6).all(), (mc, s_ex.grad[0], se)


def test_the_teachers_logits_are_float32_under_bf16_autocast(monkeypatch):
    """04's online teacher under CPU bf16 autocast: the logits the loss sees are float32 (the
    distribution a student is taught is the teacher's, not its bf16 rounding), equal to the
    teacher's float32 output layer applied to its hidden states."""
    seen = []
    real = L04.loss_sums
    monkeypatch.setattr(L04, "loss_sums", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    one_step_change(1, "fkl", dtype=torch.float32, train_dtype="bf16")
    assert seen and all(t.dtype == torch.float32 for t in seen)
    seqs, P, _ = mixed_samples(8)
    x, _ = make_batch(seqs, prompt_lens=P)
    teacher = other_teacher(torch.float32)
    with Precision("cpu", "bf16").autocast():
        h = teacher.hidden(x)
    want = F.linear(h.float(), teacher.lm_head.weight)
    assert torch.equal(seen[0], want)
    assert not torch.equal(seen[0], want.bfloat16().float())  # (bf16 rounding would show)


@pytest.mark.slow
def test_torchrun_on_policy_sums_the_step_tokens_over_processes(start_copy):
    """On-policy under torchrun: each process writes its own samples, whose lengths only it knows; the
    step's token count (the loss's denominator) is summed over both, so the log counts every token the
    untrained student wrote (about the teacher's lengths: it rarely ends a text), not one process's half;
    so are the compute counts. With --kd rkl-sampled, whose logged loss is the reverse-KL estimate."""
    keep_train_samples(start_copy, 16, n_val=4)  # 2 processes x 2 micro-batches of 4
    r = train(start_copy, "--kd", "rkl-sampled", "--on-policy", "1", "--epochs", "1", "--log-interval", "1",
              torchrun=True)
    assert "student sampling" in r.stdout
    for line in ("val before training", "step    1/", "trained in"):  # one process speaks for both
        assert r.stdout.count(line) == 1, line
    log = load_artifact(str(start_copy / "train_log.pt"), "train_log")
    gen = load_artifact(str(start_copy / "generated.pt"), "generated")
    teacher_tokens = sum(len(s) - P for s, P in zip(gen["train"], gen["train_prompt_lens"]))
    assert log["world"] == 2 and 0.75 * teacher_tokens < log["tokens"] <= teacher_tokens
    prompts = sum(P - 1 for P in gen["train_prompt_lens"])
    assert log["student_tokens"] == log["sampled_tokens"] == log["tokens"] + prompts


def test_03_from_teacher_copies_every_other_block_and_the_embeddings(start_copy):
    """03 --from-teacher: the student's logits are those of a model built by hand from the teacher's
    blocks 0, 2, ... (a random 4-layer teacher), and the lesson writes that student."""
    lesson = load_lesson("03_student.py")
    torch.manual_seed(1)
    teacher = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=4, n_head=2, n_embd=16, init_std=0.3))
    student = lesson.every_other_block(teacher)
    by_hand = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16))
    for i, j in ((0, 0), (1, 2)):
        by_hand.transformer.h[i].load_state_dict(teacher.transformer.h[j].state_dict())
    for part in ("wte", "wpe", "ln_f"):
        getattr(by_hand.transformer, part).load_state_dict(getattr(teacher.transformer, part).state_dict())
    x = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(student.eval()(x)[0], by_hand.eval()(x)[0])
    r = run_here(["03_student.py", "--preset", "tiny", "--out", str(start_copy), "--from-teacher"])
    assert r.returncode == 0, r.stderr
    init = load_artifact(str(start_copy / "student_init.pt"), "student_init")
    tiny = load_artifact(str(start_copy / "teacher.pt"), "teacher")
    assert init["config"]["n_layer"] == 1 and init["config"]["n_embd"] == tiny["config"]["n_embd"]
    assert torch.equal(init["model"]["transformer.h.0.mlp.c_fc.weight"], tiny["model"]["transformer.h.0.mlp.c_fc.weight"])


def test_04_starts_from_any_gpt_with_gpt2s_vocabulary_and_refuses_another(start_copy):
    """--init takes a teacher checkpoint (a pretrained GPT-2 written by 01); a model over another
    vocabulary is refused in one line, before any training."""
    from common.plumbing.artifacts import model_checkpoint
    keep_train_samples(start_copy, 8, n_val=2)
    r = run_here(["04_train.py", "--preset", "tiny", "--out", str(start_copy), "--epochs", "1",
                  "--init", str(start_copy / "teacher.pt")])
    assert r.returncode == 0 and "trained in" in r.stdout, r.stderr
    other = GPT(GPTConfig(block_size=128, vocab_size=1000, n_layer=1, n_head=2, n_embd=16))
    save_artifact(model_checkpoint(other, "teacher", preset="tiny"), str(start_copy / "other.pt"))
    r = run_here(["04_train.py", "--preset", "tiny", "--out", str(start_copy), "--init", str(start_copy / "other.pt")])
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "vocabulary of 1000 tokens" in r.stderr and "GPT-2's 50257" in r.stderr


def test_a_steps_token_counts_split_own_and_teacher_text():
    """tokens_of_step at --on-policy 0.5: a micro-batch the student wrote (shorter than the teacher's)
    and one of the teacher's samples; the scored tokens of both, the positions the student trained on
    (prompts after their first token, and every scored target), and those it ran while writing (only
    its own micro-batch's)."""
    from common.plumbing.distributed import Processes
    teacher = [torch.arange(10), torch.arange(8), torch.arange(12), torch.arange(6)]
    P = [3, 2, 4, 1]
    data = {"train": teacher, "train_prompt_lens": P}
    own = [torch.arange(5), torch.arange(8)]  # the student's continuations of prompts 0 and 1
    micro = [make_batch(own, prompt_lens=P[:2]) + [None], make_batch(teacher[2:], prompt_lens=P[2:]) + [None]]
    chunks = [[([0, 1], True), ([2, 3], False)]]
    procs = Processes(ddp=False, rank=0, world=1, device="cpu")
    counts = L04.tokens_of_step(chunks, data, micro, 0.5, procs)
    own_scored, teacher_scored = (5 - 3) + (8 - 2), (12 - 4) + (6 - 1)
    assert counts == {"tokens": own_scored + teacher_scored,
                      "student_tokens": own_scored + teacher_scored + (2 + 1) + (3 + 0),
                      "sampled_tokens": own_scored + 2 + 1}
