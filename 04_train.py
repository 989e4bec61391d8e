"""Lesson 04: distillation. Train the student on the teacher's texts with a training loop written
out by hand: mixed precision (bf16, or fp16 with a GradScaler), AdamW, warmup then cosine decay,
gradient clipping and accumulation, and optionally several GPUs. --kd picks the kind: seq (Kim &
Rush, 2016), soft (Hinton et al., 2015), fkl/rkl/jsd/tvd to the teacher's full distribution (GKD)
on its text or, with --on-policy, the student's own; rkl-sampled (on-policy distillation, 2025).
Each loss is written out in loss_by_hand (printed for the first batch beside the loss the loop
trains on), one step in train_step. A prompt is context, never a target; the <|endoftext|> that
ends a sample is one (the student must learn to stop).

Reads:  artifacts/student_init.pt, generated.pt (teacher.pt for the online kinds; train_state.pt)
Writes: artifacts/student.pt (the lowest val loss), student_last.pt, train_log.pt at the end;
        train_state.pt at each epoch end and on Ctrl-C, to resume
Run:    python 04_train.py                (add --preset tiny for a CPU smoke run)
        torchrun --nproc_per_node=2 04_train.py   (data parallel on 2 GPUs, or 2 CPU processes)
"""
import math
import time
from contextlib import nullcontext
from functools import partial

import torch
from torch.nn import functional as F

from common.distill import KD, ONLINE, loss_sums, make_batch
from common.model import logits_fp32
from common.perplexity import mean_nll
from common.plumbing import cli, distributed, train_state
from common.plumbing.artifacts import LessonError, ctrl_c_finishes_the_step, run_lesson
from common.plumbing.device import autocast, deterministic, keep_freed_memory, sync
from common.plumbing.progress import Speedometer, describe_run, show_first_loss
from common.plumbing.train_inputs import load_inputs
from common.sampling import continue_each
from common.tokenizer import EOT

# --- settings (flags left unset take the preset's values) ---
# Learning rate: from random weights the 6/512 student takes a from-scratch peak, 1e-3 (GPT-3, table
# 2.1: 6e-4 at 125M), not a fine-tuning 5e-5; the tiny 2/32 one 1e-2 (measured: docs/results.md).
PRESETS = {"gpt2": dict(epochs=3, lr=1e-3, batch_size=8),
           "tiny": dict(epochs=6, lr=1e-2, batch_size=4)}


def get_args():
    p = cli.lesson_parser(__doc__)
    flag = p.add_argument
    flag("--kd", choices=["seq", "soft", *ONLINE], default="seq",
         help="seq: CE on the teacher's text; soft: + its stored top-K distributions; fkl, rkl, "
              "jsd, tvd: a divergence to its full distributions, the teacher running beside the "
              "student; rkl-sampled: reverse KL from the teacher's log-prob of each token the "
              "student sampled (needs --on-policy 1) (default: seq)")
    flag("--soft-tail", choices=["renorm", "rest"], default="renorm",
         help="--kd soft: the teacher's top K renormalised (renorm), or with the rest of the "
              "vocabulary as one bucket (rest, needs --kd-temperature 1) (default: renorm)")
    flag("--jsd-beta", type=cli.unit_float, default=0.5,
         help="--kd jsd: beta of the generalized JSD, strictly between 0 and 1 (default: 0.5)")
    flag("--on-policy", type=cli.unit_float, default=0.0,
         help="share of the micro-batches on which the student writes the text and the teacher "
              "grades it (needs an online --kd; default: 0, the teacher's samples only)")
    flag("--on-policy-temperature", type=cli.nonneg_float, default=1.0,
         help="the student's sampling temperature for --on-policy (0: greedy; default: 1.0)")
    flag("--kd-temperature", type=cli.positive_float, default=2.0,
         help="soft KD: softening temperature T")
    flag("--kd-alpha", type=cli.unit_float, default=0.5,
         help="soft KD: weight of the KL term (1-alpha: CE)")
    flag("--epochs", type=cli.positive_int,
         help="passes over the training texts (gpt2: 3, tiny: 6)")
    flag("--batch-size", type=cli.positive_int,
         help="sequences per micro-batch, per GPU (gpt2: 8, tiny: 4)")
    flag("--grad-accum", type=cli.positive_int, default=1, help="micro-batches per optimizer step")
    flag("--lr", type=cli.positive_float, help="peak learning rate (gpt2: 1e-3, tiny: 1e-2)")
    flag("--min-lr-ratio", type=cli.unit_float, default=0.1,
         help="final learning rate as a share of --lr")
    flag("--warmup-steps", type=cli.nonneg_int, help="linear warmup (default: 10%% of the steps)")
    flag("--weight-decay", type=cli.unit_float, default=0.1,
         help="AdamW weight decay (matrices only)")
    flag("--grad-clip", type=cli.positive_float, default=1.0, help="clip the gradient norm to this")
    flag("--dropout", type=cli.unit_float, default=0.0,
         help="dropout in the student while training")
    flag("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
         help="auto: bf16 on GPUs with bf16 units (compute capability 8.0+), fp16 + GradScaler "
              "on older ones (T4, V100), fp32 on the CPU")
    flag("--deterministic", action="store_true",
         help="deterministic GPU kernels: two runs (and a run and its --resume) give the same "
              "weights on a GPU too, somewhat slower (a CPU run is deterministic without it)")
    flag("--log-interval", type=cli.positive_int, default=10,
         help="optimizer steps between log lines")
    flag("--seed", type=int, default=1337, help="seed for the data order and dropout")
    flag("--resume", action="store_true", help="continue from train_state.pt in --out")
    flag("--stop-after", type=cli.positive_int,
         help="stop (and save train_state.pt) after this many steps; finish later with --resume")
    flag("--init", type=cli.existing_file,
         help="start from this student (default: student_init.pt)")
    return cli.parse(p, PRESETS)


# --- the losses, written out ---
def loss_by_hand(logits, y, kd, topk=None, teacher_logits=None):
    """The mean loss per scored token, each kind's formula written out plainly (a test checks it
    against common/distill.py's loss_sums, which the loop trains on)."""
    scored = y != -100
    log_q = F.log_softmax(logits.float(), dim=-1)                  # the student's log-probs
    ce = -log_q.gather(-1, y.clamp(min=0)[..., None])[..., 0][scored].mean()  # -log q(teacher's)
    if kd.kind == "seq":
        return ce
    if kd.kind == "soft" and kd.tail == "rest":  # at T = 1: the K tokens, the rest as one bucket
        ids, lps = topk
        p, q_k = lps.float().exp(), log_q.exp().gather(-1, ids.long())
        p = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)                 # K + 1 buckets
        q = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
        kl = (p * (p.clamp(min=1e-30).log() - q.log())).sum(-1)
        return kd.alpha * kl[scored].mean() + (1 - kd.alpha) * ce
    if kd.kind == "soft":  # Hinton: both sides softened by T, the teacher known over its top K
        ids, lps = topk
        p = F.softmax(lps.float() / kd.T, dim=-1)                  # teacher, renormalised over K
        log_q_T = F.log_softmax(logits.float() / kd.T, dim=-1)
        log_q_T = log_q_T.gather(-1, ids.long())                   # student, read at those K
        kl = (p * (p.log() - log_q_T)).sum(-1)
        return kd.alpha * kd.T * kd.T * kl[scored].mean() + (1 - kd.alpha) * ce
    p = F.softmax(teacher_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    q = log_q.exp()
    if kd.kind == "fkl":                                           # sum p (log p - log q)
        return (p * (log_p - log_q)).sum(-1)[scored].mean()
    if kd.kind == "rkl":                                           # sum q (log q - log p)
        return (q * (log_q - log_p)).sum(-1)[scored].mean()
    if kd.kind == "tvd":                                           # (1/2) sum |p - q|
        return 0.5 * (p - q).abs().sum(-1)[scored].mean()
    if kd.kind == "rkl-sampled":  # y: the tokens the student wrote; the teacher's log p of each
        log_q_y = log_q.gather(-1, y.clamp(min=0)[..., None])[..., 0]
        log_p_y = log_p.gather(-1, y.clamp(min=0)[..., None])[..., 0]
        reward = (log_q_y - log_p_y).detach()
        surrogate = reward * log_q_y          # its gradient, over y ~ q, is the reverse KL's
        # the value shown is the reverse-KL estimate (reward); the gradient is the surrogate's
        return (surrogate - surrogate.detach() + reward)[scored].mean()
    # jsd: the mixture m, and log(m) of a sum (token_divergence keeps it in log space)
    log_m = (kd.beta * p + (1 - kd.beta) * q).log()
    jsd = kd.beta * (p * (log_p - log_m)).sum(-1) + (1 - kd.beta) * (q * (log_q - log_m)).sum(-1)
    return jsd[scored].mean()


# --- one optimizer step ---
def train_step(model, optimizer, scaler, micro, step_tokens, device, dtype, grad_clip, kd,
               world=1, teacher=None):
    """One optimizer step over this process's micro-batches [(x, y, topk or None), ...], its loss
    the mean over the step_tokens scored tokens of the WHOLE step (all micro-batches, processes).
    Returns this process's (loss sum, cross-entropy sum) and the gradient norm before clipping."""
    loss_sum = ce_sum = 0.0
    for j, (x, y, topk) in enumerate(micro):
        # DDP averages gradients across processes on every backward; during accumulation only the
        # last micro-batch needs that, so the others skip the communication.
        last = j == len(micro) - 1
        with model.no_sync() if world > 1 and not last else nullcontext():
            with autocast(device, dtype):
                logits, _ = model(x)
                with torch.no_grad():  # (B, L, V) in float32 whatever the autocast dtype
                    teacher_logits = logits_fp32(teacher, x) if kd.kind in ONLINE else None
            loss, ce = loss_sums(logits, y, kd, topk, teacher_logits)
            # / step_tokens, not this micro-batch's mean (a short one's tokens weigh more); * world:
            # DDP averages over processes; scaler.scale: fp16's small gradients must not underflow
            scaler.scale(loss * world / step_tokens).backward()
        loss_sum, ce_sum = loss_sum + loss.detach(), ce_sum + ce.detach()  # no wait for the GPU
    scaler.unscale_(optimizer)  # true gradients again before clipping (a no-op without fp16)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)      # skips the step if fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return float(loss_sum), float(ce_sum), float(norm)  # one wait for the device, once a step


# --- on-policy: the student writes the sampled part itself ---
def student_samples(student, seqs, prompt_lens, temperature):
    """The student continues each prompt (no gradients) for as many tokens as the teacher's sample,
    stopping after an <|endoftext|> (kept); from the global random stream: a resume draws alike."""
    was_training = student.training  # (generate leaves it in eval mode)
    samples = continue_each(student, [s[:P] for s, P in zip(seqs, prompt_lens)],
                            [len(s) - P for s, P in zip(seqs, prompt_lens)], EOT, temperature,
                            fast_layout=False)  # AdamW's state is laid out like the weights: keep
    student.train(was_training)
    return samples


# --- the schedule ---
def lr_at(step, total, warmup, lr, min_lr):
    """Linear warmup to lr over `warmup` steps, then cosine decay to min_lr at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


# --- the epoch's batches ---
def chunks_of_epoch(n, batch_size, seed, epoch, on_policy, world, n_micro):
    """Every rank's n_micro micro-batches of an epoch, each (sample indices, on-policy?): a seeded
    shuffle cut into batches, rank r taking every world-th from r (all ranks computed, to count)."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    chunks = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    own = (torch.rand(len(chunks), generator=g) < on_policy).tolist()  # after it: 0 keeps the order
    return [list(zip(chunks[r::world], own[r::world]))[:n_micro] for r in range(world)]


def micro_batch(idx, data, kd, device, student=None, temperature=1.0, speed=None):
    """The micro-batch (x, y, topk or None) of these samples; given a student, it writes them."""
    seqs = [data["train"][k] for k in idx]
    P = [data["train_prompt_lens"][k] for k in idx]
    if student is not None:
        t0 = time.time()
        seqs = student_samples(student, seqs, P, temperature)
        speed.sampled(time.time() - t0, sum(len(s) - p for s, p in zip(seqs, P)))
    topk = ([data["train_topk_ids"][k] for k in idx],
            [data["train_topk_logprobs"][k] for k in idx]) if kd == "soft" else ()
    x, y, *topk = make_batch(seqs, *topk, device=device, prompt_lens=P)
    return x, y, topk or None


def tokens_of_step(step_chunks, data, micro, on_policy, procs):
    """The whole step's token counts, all processes: "tokens" scored (the loss's denominator),
    "student_tokens" trained on (prompts too), "sampled_tokens" run while writing on-policy text."""
    P = data["train_prompt_lens"]
    if not on_policy:  # known from the teacher's samples; the student's own have their own lengths
        idx = [k for chunks in step_chunks for ks, _ in chunks for k in ks]
        scored = sum(len(data["train"][k]) - P[k] for k in idx)
        return {"tokens": scored, "student_tokens": scored + sum(P[k] - 1 for k in idx),
                "sampled_tokens": 0}
    mine = [(int((y != -100).sum()), sum(P[k] - 1 for k in ks), own)  # (scored, prompts, own?)
            for (ks, own), (_, y, _) in zip(step_chunks[procs.rank], micro)]
    counts = [sum(n for n, _, _ in mine), sum(n + p for n, p, _ in mine),
              sum(n + p for n, p, own in mine if own)]
    return dict(zip(["tokens", "student_tokens", "sampled_tokens"],
                    map(int, distributed.all_sum(procs, counts))))


def main():
    args = get_args()
    if args.deterministic:
        deterministic()  # before the first GPU kernel
    procs = distributed.start()  # one process, or one per GPU under torchrun
    device, log = procs.device, procs.print
    if device == "cpu":
        keep_freed_memory()  # each step makes tensors of hundreds of MB: reuse their pages
    torch.manual_seed(args.seed + procs.rank)  # dropout (the data order has its own generator)
    prec = distributed.agreed_precision(procs, args.dtype)  # bf16, fp16 + GradScaler, fp32
    dtype, scaler = prec.dtype, prec.scaler()

    # --- data, models, optimizer (each misfit refused in one line: plumbing/train_inputs.py) ---
    data, raw, init_ckpt, teacher = load_inputs(args, device, dtype)
    model = distributed.wrap(raw.to(device), procs)  # in DDP under torchrun
    optimizer = raw.configure_optimizer(args.lr, args.weight_decay, device)  # AdamW

    # --- schedule: every rank gets the same number of micro-batches per epoch ---
    micro_per_epoch = (math.ceil(len(data["train"]) / args.batch_size) // procs.world) or 1
    steps_per_epoch = math.ceil(micro_per_epoch / args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, total_steps // 10)
    chunks_of = partial(chunks_of_epoch, len(data["train"]), args.batch_size, args.seed,
                        on_policy=args.on_policy, world=procs.world, n_micro=micro_per_epoch)
    ga = args.grad_accum

    # --- state: fresh, or from train_state.pt with --resume (common/plumbing/train_state.py) ---
    state_path, settings = f"{args.out}/train_state.pt", train_state.settings_of(args, dtype)
    state = train_state.start(state_path, args.resume, procs, raw, optimizer, scaler, settings,
                              init_ckpt["config"], args.init or f"{args.out}/student_init.pt",
                              total_steps)
    save = partial(train_state.save, state_path, procs, state, raw, optimizer, scaler,
                   total_steps=total_steps, config=init_ckpt["config"], settings=settings)
    evaluate = partial(mean_nll, raw, data["val"], data["val_prompt_lens"], args.batch_size,
                       device, dtype)
    kd = KD.from_args(args)  # the distillation flags, as one object
    log(describe_run(args, raw, data, procs, dtype, scaler, teacher, steps_per_epoch, warmup))

    # --- the training loop ---
    raw.train()
    first_step, speed = state.step, Speedometer(on_policy=args.on_policy)
    ctrl_c_said = lambda: log(f"\nCtrl-C: finishing step {state.step + 1}, then saving "
                              f"{state_path} (Ctrl-C again to stop at once)")
    with train_state.failures_explained(state, state_path, args.batch_size, args.grad_accum), \
            ctrl_c_finishes_the_step(ctrl_c_said) as ctrl_c:
        if state.step == 0:  # the val loss before training; the first batch's loss written out
            state.history["val"].append((0, evaluate()))
            first = micro_batch(chunks_of(0)[0][0][0], data, args.kd, device)
            show_first_loss(state.history, first, raw, teacher, procs, dtype, loss_by_hand,
                            loss_sums, kd)
        while state.step < total_steps:
            # --- one step: this process's micro-batches (on-policy: the student writes them) ---
            epoch, i = divmod(state.step, steps_per_epoch)
            step_chunks = [c[i * ga:(i + 1) * ga] for c in chunks_of(epoch)]  # every rank's
            micro = [micro_batch(idx, data, args.kd, device, raw if own else None,
                                 args.on_policy_temperature, speed)
                     for idx, own in step_chunks[procs.rank]]
            counts = tokens_of_step(step_chunks, data, micro, args.on_policy, procs)
            lr = lr_at(state.step, total_steps, warmup, args.lr, args.lr * args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, ce_sum, norm = train_step(model, optimizer, scaler, micro, counts["tokens"],
                                                device, dtype, args.grad_clip, kd, procs.world,
                                                teacher)
            # the step's mean loss over all its tokens (all processes); did anyone hit Ctrl-C?
            loss_sum, ce_sum, stop = distributed.all_sum(procs, [loss_sum, ce_sum,
                                                                 ctrl_c.requested])
            loss, ce = loss_sum / counts["tokens"], ce_sum / counts["tokens"]
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {state.step + 1}")
            state.step += 1
            state.record(counts, loss=loss, ce=ce, lr=lr, grad_norm=norm)
            speed.tokens += counts["tokens"]
            # --- once in a while: log ---
            if state.step % args.log_interval == 0 or state.step == total_steps:
                sync(device)
                log(speed.line(state, total_steps, epoch, args.log_interval, first_step))
            # --- epoch end: validate, keep the best, save ---
            if state.step % steps_per_epoch == 0:
                v = evaluate()
                best = state.keep_if_best(v, raw, args.preset)
                save()
                log(f"epoch {epoch + 1} | val loss {v:.4f} | val ppl {math.exp(v):.1f}"
                    + (" | best so far" if best else ""))
            # --- stop early: Ctrl-C, or --stop-after ---
            asked = args.stop_after and state.step - first_step >= args.stop_after
            if (stop or asked) and state.step < total_steps:
                if state.step % steps_per_epoch:  # (at an epoch end it was just saved)
                    save()
                distributed.end(procs)
                if stop:
                    raise LessonError(f"interrupted at step {state.step}: saved {state_path}; "
                                      f"continue with --resume")
                return log(f"stopped after {state.step - first_step} steps as asked "
                           f"(--stop-after); wrote {state_path}; continue with --resume")

    # --- done: the best student, the last one and the log (train_state.pt is already saved) ---
    train_state.save_results(args.out, state, raw, args, dtype, procs, steps_per_epoch,
                             state.step - first_step)
    distributed.end(procs)


if __name__ == "__main__":
    run_lesson(main, oom="a smaller --batch-size, a larger --grad-accum (the same effective batch)")
