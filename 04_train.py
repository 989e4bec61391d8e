"""Lesson 04: distillation. Train the student on the teacher's texts with a training loop written out
by hand: mixed precision (bf16, or fp16 with a GradScaler), AdamW, warmup then cosine decay, gradient
clipping and accumulation, and optionally several GPUs. The kinds of distillation:
  --kd seq   sequence-level KD: cross-entropy on the teacher's sampled tokens (Kim & Rush, 2016)
  --kd soft  plus Hinton's soft targets: match the teacher's stored top-K distributions (Hinton et al., 2015)
  --kd fkl | rkl | jsd   the teacher runs beside the student and gives its full next-token distribution
             on every batch; the student minimises forward KL, reverse KL (MiniLLM, Gu et al., 2024) or
             GKD's generalized JSD (Agarwal et al., 2024) to it (see token_divergence in common/distill.py)
  --on-policy LAMBDA   with fkl, rkl or jsd: for that share of the micro-batches the student writes its
             own continuation of each prompt, and the teacher grades those tokens instead of its own
             (on-policy distillation, as in GKD): the student learns on the text it actually produces
Each loss is written out plainly in loss_by_hand (printed for the first batch beside the loss the loop
trains on), and one training step (forward, scaled backward, unscale, clip, step) in train_step.
Only sampled tokens are trained on: a sample's prompt is context, never a target. The <|endoftext|>
that ends a sample is a target (the student must learn to stop); nothing after it is.

Reads:  artifacts/student_init.pt, artifacts/generated.pt  (and artifacts/train_state.pt with --resume)
Writes: artifacts/student.pt (the lowest val loss), student_last.pt, train_log.pt, all three when
        training finishes; artifacts/train_state.pt at each epoch end and on Ctrl-C, to resume
Run:    python 04_train.py                (add --preset tiny for a CPU smoke run)
        torchrun --nproc_per_node=2 04_train.py   (data parallel on 2 GPUs, or 2 CPU processes)
"""
import math
import os
import signal
import threading
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from common.artifacts import (LessonError, check_preset, load_artifact, load_model, model_checkpoint, run_lesson,
                              save_artifact)
from common.cli import existing_file, lesson_parser, nonneg_float, nonneg_int, parse, positive_float, positive_int, unit_float
from common.device import autocast, fused_adamw, get_device, keep_freed_memory, needs_scaler, pick_dtype, sync
from common.distill import make_batch, soft_kd_kl, token_divergence
from common.model import GPT, GPTConfig
from common.perplexity import sequences_nll
from common.sampling import continue_each
from common.tokenizer import EOT, get_tokenizer

# --- settings (flags left unset take the preset's values) ---
# Learning rate: a fine-tuning rate such as 5e-5 barely moves a student trained from random weights.
# For the 6/512 student we use 1e-3, the usual peak rate for a transformer of that size trained from
# scratch (GPT-3 paper, table 2.1: 6e-4 at 125M, higher below). The tiny 2/32 student takes 1e-2
# ("Choosing the learning rate" in the README has the measured val perplexities).
PRESETS = {
    "gpt2": dict(epochs=3, lr=1e-3, batch_size=8),
    "tiny": dict(epochs=6, lr=1e-2, batch_size=4),
}
# Flags that cannot change the trained weights: they may differ between a run and its --resume.
# Every other flag must be the same, or the resumed run would not be the run that was started.
RESUME_MAY_CHANGE = ("out", "preset", "resume", "log_interval", "stop_after")


def lr_at(step, total, warmup, lr, min_lr):
    """Linear warmup to lr over `warmup` steps, then cosine decay to min_lr at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


ONLINE = ("fkl", "rkl", "jsd")  # the kinds that need the teacher's full distributions, computed as we train


def loss_sums(logits, y, kd="seq", topk=None, alpha=0.5, T=2.0, teacher_logits=None, beta=0.5):
    """(training loss, cross-entropy), each SUMMED over the scored tokens (y != -100).

    seq:  cross-entropy on the teacher's sampled tokens.
    soft: Hinton's mix, alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy, with the
          teacher's distribution known only over its stored top K (see common/distill.py).
    fkl, rkl, jsd: the divergence between the teacher's full distribution (teacher_logits) and the
          student's at every scored position, at temperature 1; the cross-entropy is only reported.
    Sums, not means: the caller divides by the number of scored tokens in the whole optimizer step.
    """
    # for the online kinds the cross-entropy is only reported: computed without a graph (which would keep its tensors)
    with torch.no_grad() if kd in ONLINE else nullcontext():
        ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-100, reduction="sum")
    if kd == "seq":
        return ce, ce
    if kd in ONLINE:
        # float32 (B, L, V) tensors at the peak of forward + backward, beyond the two logits tensors: 5.3 for
        # fkl, 6.3 for rkl, 10.5 for jsd (measured: bench/divergence_memory.py; the README has the T4 arithmetic)
        return token_divergence(logits, teacher_logits, kd, beta=beta)[y != -100].sum(), ce
    kl = soft_kd_kl(logits, *topk, T)[y != -100].sum()
    return alpha * T * T * kl + (1 - alpha) * ce, ce


def loss_by_hand(logits, y, kd, topk=None, alpha=0.5, T=2.0, teacher_logits=None, beta=0.5):
    """The mean loss per scored token, each kind's formula written out plainly (loss_sums computes the
    same through common/distill.py, in float32 and in log space; a test checks they agree)."""
    scored = y != -100
    log_q = F.log_softmax(logits.float(), dim=-1)                                 # the student's log-probs
    ce = -log_q.gather(-1, y.clamp(min=0)[..., None])[..., 0][scored].mean()      # -log q(the teacher's token)
    if kd == "seq":
        return ce
    if kd == "soft":  # Hinton: both sides softened by T, the teacher known over its top K only
        ids, lps = topk
        p = F.softmax(lps.float() / T, dim=-1)                                    # teacher, renormalised over K
        log_q_T = F.log_softmax(logits.float() / T, dim=-1).gather(-1, ids.long())  # student, read at those K
        kl = (p * (p.log() - log_q_T)).sum(-1)
        return alpha * T * T * kl[scored].mean() + (1 - alpha) * ce
    p, log_p = F.softmax(teacher_logits.float(), dim=-1), F.log_softmax(teacher_logits.float(), dim=-1)
    q = log_q.exp()
    if kd == "fkl":                                                               # sum p (log p - log q)
        return (p * (log_p - log_q)).sum(-1)[scored].mean()
    if kd == "rkl":                                                               # sum q (log q - log p)
        return (q * (log_q - log_p)).sum(-1)[scored].mean()
    m = beta * p + (1 - beta) * q  # jsd: the mixture; log(m) of a sum (token_divergence keeps it in log space)
    return (beta * (p * (log_p - m.log())).sum(-1) + (1 - beta) * (q * (log_q - m.log())).sum(-1))[scored].mean()


def train_step(model, optimizer, scaler, micro, step_tokens, device, dtype, grad_clip, kd="seq", alpha=0.5, T=2.0,
               world=1, teacher=None, beta=0.5):
    """One optimizer step: forward and backward over this process's micro-batches, then one update.

    micro: [(x, y, topk or None), ...] this process's share of the step. step_tokens: the scored tokens
    in the WHOLE step (all micro-batches of all processes). The step's loss is the mean over those
    tokens, however they are split: each micro-batch adds its loss sum / step_tokens. (Averaging each
    micro-batch's own mean instead would weight a token of a short micro-batch more.) DDP averages the
    gradients of the `world` processes, so each process multiplies by world to keep the sum.
    With an online kind (fkl, rkl, jsd) the teacher runs on the same micro-batch, without gradients.
    Returns this process's (loss sum, cross-entropy sum) and the gradient norm before clipping.
    """
    loss_sum = ce_sum = 0.0
    for j, (x, y, topk) in enumerate(micro):
        # DDP averages gradients across processes on every backward; during accumulation only the
        # last micro-batch needs that, so the others skip the communication.
        sync_ctx = model.no_sync() if world > 1 and j < len(micro) - 1 else nullcontext()
        with sync_ctx:
            with autocast(device, dtype):
                logits, _ = model(x)
                with torch.no_grad():
                    teacher_logits = teacher(x)[0] if kd in ONLINE else None  # (B, L, V), one micro-batch at a time
            loss, ce = loss_sums(logits, y, kd, topk, alpha, T, teacher_logits, beta)
            # scaler.scale multiplies the loss (fp16 only) so that small gradients don't underflow.
            scaler.scale(loss * world / step_tokens).backward()
        loss_sum = loss_sum + loss.detach()  # kept on the device: reading it now would wait for the GPU
        ce_sum = ce_sum + ce.detach()
    scaler.unscale_(optimizer)  # true gradients again before clipping (a no-op without fp16)
    norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    scaler.step(optimizer)      # skips the step if fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return float(loss_sum), float(ce_sum), float(norm)  # one wait for the device, once a step


def student_samples(student, seqs, prompt_lens, temperature):
    """On-policy data: the student continues each sample's prompt itself (KV cache, no gradients), with
    as many new tokens as the teacher's sample has, stopping after an <|endoftext|>, which is kept: it
    is a token to learn. The result looks like the teacher's samples (prompt, then sampled tokens), so
    the same batching, masking and loss apply; only the author of the sampled tokens changed. It draws
    from the global random stream, so a resumed run (which restores it) draws the same samples."""
    was_training = student.training
    samples = continue_each(student, [s[:P] for s, P in zip(seqs, prompt_lens)],
                            [len(s) - P for s, P in zip(seqs, prompt_lens)], EOT, temperature,
                            fast_layout=False)  # the optimizer's state is laid out like the weights: keep them
    student.train(was_training)
    return samples


def rng_state(device):
    """This process's random-number state: the CPU's and, on a GPU, the GPU's (dropout draws there)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") is not None and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


def fmt_time(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"


def main():
    p = lesson_parser(__doc__)
    p.add_argument("--kd", choices=["seq", "soft", *ONLINE], default="seq",
                   help="seq: CE on the teacher's text; soft: + its stored top-K distributions; fkl, rkl, jsd: a "
                        "divergence to its full distributions, the teacher running beside the student (default: seq)")
    p.add_argument("--jsd-beta", type=unit_float, default=0.5,
                   help="--kd jsd: beta of the generalized JSD, strictly between 0 and 1 (default: 0.5)")
    p.add_argument("--on-policy", type=unit_float, default=0.0,
                   help="share of the micro-batches on which the student writes the text and the teacher grades it "
                        "(needs --kd fkl, rkl or jsd; default: 0, the teacher's samples only)")
    p.add_argument("--on-policy-temperature", type=nonneg_float, default=1.0,
                   help="the student's sampling temperature for --on-policy (0: greedy; default: 1.0)")
    p.add_argument("--kd-temperature", type=positive_float, default=2.0, help="soft KD: softening temperature T")
    p.add_argument("--kd-alpha", type=unit_float, default=0.5, help="soft KD: weight of the KL term (1-alpha: CE)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="passes over the training texts (gpt2: 3, tiny: 6)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="sequences per micro-batch, per GPU (gpt2: 8, tiny: 4)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (gpt2: 1e-3, tiny: 1e-2)")
    p.add_argument("--min-lr-ratio", type=unit_float, default=0.1, help="final learning rate as a share of --lr")
    p.add_argument("--warmup-steps", type=nonneg_int, default=None, help="linear warmup (default: 10%% of the steps)")
    p.add_argument("--weight-decay", type=unit_float, default=0.1, help="AdamW weight decay (matrices only)")
    p.add_argument("--grad-clip", type=positive_float, default=1.0, help="clip the gradient norm to this")
    p.add_argument("--dropout", type=unit_float, default=0.0, help="dropout in the student while training")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on GPUs that have it, fp16 + GradScaler on older GPUs, fp32 on CPU")
    p.add_argument("--log-interval", type=positive_int, default=10, help="optimizer steps between log lines")
    p.add_argument("--seed", type=int, default=1337, help="seed for the data order and dropout")
    p.add_argument("--resume", action="store_true", help="continue from train_state.pt in --out")
    p.add_argument("--stop-after", type=positive_int, default=None,
                   help="stop (and save train_state.pt) after this many steps; finish later with --resume")
    p.add_argument("--init", type=existing_file, default=None, help="start from this student (default: student_init.pt)")
    args = parse(p, PRESETS)
    out = args.out

    # --- processes: one, or one per GPU under torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK) ---
    ddp = "RANK" in os.environ
    if ddp:
        cuda = torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu"
        if cuda:
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, get_device()
    if device == "cpu":
        keep_freed_memory()  # every step makes tensors of hundreds of MB: reuse their pages (see common/device.py)
    master = rank == 0  # only rank 0 prints and writes files
    torch.manual_seed(args.seed + rank)  # dropout masks (the data order has its own seeded generator)
    log = print if master else (lambda *a, **k: None)

    # --- precision: chosen here, in one place ---
    dtype = pick_dtype(device.split(":")[0], args.dtype)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=needs_scaler(dtype))

    # --- data and models ---
    data = load_artifact(f"{out}/generated.pt", "generated",
                         keys=("train", "val", "train_prompt_lens", "val_prompt_lens"))
    init_path = args.init or f"{out}/student_init.pt"
    raw, init_ckpt = load_model(init_path, ("student_init", "student"), vocab_size=get_tokenizer().n_vocab)
    if args.dropout:  # rebuild with dropout switched on; the weights are the same
        raw = GPT(GPTConfig.from_dict({**init_ckpt["config"], "dropout": args.dropout}))
        raw.load_state_dict(init_ckpt["model"])
    check_preset(data, f"{out}/generated.pt", args.preset)
    check_preset(init_ckpt, init_path, args.preset)
    train, val = data["train"], data["val"]
    train_P, val_P = data["train_prompt_lens"], data["val_prompt_lens"]
    longest = max(len(s) for s in train + val) - 1
    if longest > raw.config.block_size:
        raise LessonError(f"generated.pt holds samples of {longest} tokens, longer than the student's context "
                          f"({raw.config.block_size}): run 02_generate.py with a smaller --max-new-tokens")
    if args.kd == "soft" and not data.get("train_topk_ids"):
        raise LessonError("--kd soft needs the teacher's top-K log-probs: run 02_generate.py with --topk-logits 32")
    if args.kd == "jsd" and not 0 < args.jsd_beta < 1:
        raise LessonError(f"--jsd-beta must be strictly between 0 and 1 (got {args.jsd_beta}); 0 and 1 are "
                          f"--kd fkl and --kd rkl in the limit")
    if args.on_policy and args.kd not in ONLINE:
        raise LessonError(f"--on-policy needs the teacher online to grade the student's text: use it with --kd fkl, "
                          f"rkl or jsd, not --kd {args.kd} (which train on the teacher's stored samples)")
    teacher = None
    if args.kd in ONLINE:  # the teacher beside the student: eval mode, no gradients, half precision on a GPU
        teacher, _ = load_model(f"{out}/teacher.pt", "teacher", vocab_size=raw.config.vocab_size)
        if teacher.config.block_size < longest:
            raise LessonError(f"the teacher's context ({teacher.config.block_size}) is shorter than the samples")
        teacher.requires_grad_(False)
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype) if device.startswith("cuda") else None
        teacher.to(device=device, dtype=half or torch.float32)
    scored = [len(s) - P for s, P in zip(train, train_P)]  # tokens the teacher sampled: the targets
    raw.to(device)
    model = DDP(raw, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None) if ddp else raw
    allreduces = [0]  # backward passes whose gradients crossed between processes
    if ddp:  # the all-reduce DDP does, written out (sum, divided by world), with a counter
        def mean_allreduce(_, bucket):
            allreduces[0] += bucket.index() == 0
            grads = bucket.buffer().div_(world)
            return dist.all_reduce(grads, async_op=True).get_future().then(lambda fut: fut.value()[0])
        model.register_comm_hook(None, mean_allreduce)

    # --- optimizer: AdamW, weight decay on matrices only (not on biases and LayerNorm gains) ---
    params = [p for p in raw.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=fused_adamw(device))

    # --- schedule: every rank gets the same number of micro-batches per epoch ---
    micro_per_epoch = (math.ceil(len(train) / args.batch_size) // world) or 1
    steps_per_epoch = math.ceil(micro_per_epoch / args.grad_accum)
    total_steps = steps_per_epoch * args.epochs
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, total_steps // 10)
    min_lr = args.lr * args.min_lr_ratio

    # --- state: fresh, or from train_state.pt ---
    step, best_val, wall_before = 0, float("inf"), 0.0
    history = {"step": [], "loss": [], "ce": [], "lr": [], "grad_norm": [], "val": [], "tokens": 0}
    best = None  # the checkpoint with the lowest val loss so far; written as student.pt at the end, so an
                 # interrupted or failed run never replaces the student.pt of an earlier, finished one
    state_path = f"{out}/train_state.pt"
    settings = {k: v for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE}
    settings["dtype"] = dtype  # as resolved ("auto" means fp32 on a CPU, bf16 or fp16 on a GPU)
    if args.resume:
        st = load_artifact(state_path, "train_state", keys=("model", "optimizer", "step", "config", "settings"))
        if st["config"] != init_ckpt["config"]:
            raise LessonError(f"{state_path} is for a different student than {init_path}: run without --resume")
        changed = [k for k in settings if st["settings"].get(k) != settings[k]]
        changed += ["process count"] if st.get("world", 1) != world else []
        if changed:
            was = ", ".join(f"--{k.replace('_', '-')} {st['settings'].get(k)}" for k in changed if k in settings)
            raise LessonError(f"{state_path} was made with other settings ({', '.join(changed)}"
                              f"{': it had ' + was if was else ''}): resume with the same flags, or run without --resume")
        raw.load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        scaler.load_state_dict(st["scaler"])
        step, best_val, history, best = st["step"], st["best_val"], st["history"], st.get("best")
        wall_before = st.get("wall_time", 0.0)
        set_rng_state(st["rng"][rank], device)  # each process continues its own random stream
        log(f"resumed from {state_path} at step {step}/{total_steps}")
    elif master and os.path.exists(state_path):
        try:  # mmap: read the step count without loading the weights
            old = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)
            unfinished = old["step"] < old.get("total_steps", float("inf"))
        except Exception:
            unfinished = True
        if unfinished:
            os.replace(state_path, f"{out}/train_state.prev.pt")
            log(f"an unfinished run's {state_path} is kept as train_state.prev.pt (rename it back to resume it)")

    def save_state():
        """Write train_state.pt: everything needed to continue exactly where we are (called by every
        process, since each contributes its own random-number state; only rank 0 writes)."""
        states = [None] * world
        if ddp:
            dist.all_gather_object(states, rng_state(device))
        else:
            states = [rng_state(device)]
        if master:
            save_artifact({"kind": "train_state", "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                           "scaler": scaler.state_dict(), "step": step, "total_steps": total_steps,
                           "best_val": best_val, "best": best, "history": history, "rng": states,
                           "config": init_ckpt["config"], "world": world, "settings": settings,
                           "wall_time": wall_before + time.time() - t_start}, state_path)

    def evaluate():
        raw.eval()
        with autocast(device, dtype):
            nll, n = sequences_nll(raw, val, batch_size=args.batch_size, prompt_lens=val_P)
        raw.train()
        return nll / n

    def chunks_of_epoch(epoch):
        """Every rank's micro-batches for an epoch, each (sample indices, on-policy?): a seeded shuffle
        cut into batches; rank r takes every world-th one, starting at r. Every rank computes all of
        them (to count the step's tokens). Each micro-batch is on-policy with probability --on-policy,
        drawn after the shuffle from the same generator, so --on-policy 0 leaves the order unchanged."""
        g = torch.Generator().manual_seed(args.seed + epoch)
        order = torch.randperm(len(train), generator=g).tolist()
        chunks = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        own = (torch.rand(len(chunks), generator=g) < args.on_policy).tolist()
        return [list(zip(chunks[r::world], own[r::world]))[:micro_per_epoch] for r in range(world)]

    n_params = raw.num_params()
    log(f"student {n_params / 1e6:.1f}M params | {len(train)} train / {len(val)} val samples, "
        f"{sum(scored):,} sampled tokens to learn from | {device} {dtype}"
        f"{' + GradScaler' if scaler.is_enabled() else ''} | {world} process(es)")
    log(f"kd {args.kd}" + (f" (T={args.kd_temperature}, alpha={args.kd_alpha})" if args.kd == "soft" else "")
        + (f" (beta={args.jsd_beta})" if args.kd == "jsd" else "")
        + (f", on-policy {args.on_policy:g} (T={args.on_policy_temperature:g})" if args.on_policy else "")
        + (" with the teacher online" if teacher is not None else "") +
        f" | {args.epochs} epochs x {steps_per_epoch} steps | batch {args.batch_size} x accum {args.grad_accum}"
        f" x {world} | lr {args.lr:.1e}, warmup {warmup}")
    def leave():
        """Processes wait for each other (rank 0 may still be writing), then disconnect together."""
        if ddp:
            dist.barrier()
            dist.destroy_process_group()

    # --- Ctrl-C: finish the step in progress, then save and stop, every process at the same step ---
    stop_requested = []

    def on_ctrl_c(signum, frame):
        if stop_requested:  # a second Ctrl-C: stop now; train_state.pt holds the last epoch's state
            raise KeyboardInterrupt
        stop_requested.append(signum)
        log(f"\nCtrl-C: finishing step {step + 1}, then saving {state_path} (Ctrl-C again to stop at once)")

    main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGINT, on_ctrl_c) if main_thread else None

    # --- the training loop ---
    raw.train()
    t_start = t_last = time.time()
    tokens_since, steps_this_run, allreduces_before = 0, 0, allreduces[0]
    sampled_since, sampling_time = 0, 0.0  # the student's own tokens (--on-policy), and the time spent writing them
    try:
        if step == 0:
            history["val"].append((0, evaluate()))
            log(f"val before training: loss {history['val'][-1][1]:.4f} | ppl {math.exp(history['val'][-1][1]):.1f}")
            if master:  # the loss of one batch, written out, beside the loss the loop trains on
                idx = chunks_of_epoch(0)[0][0][0]
                x, y, *topk = make_batch([train[k] for k in idx], *(
                    ([data["train_topk_ids"][k] for k in idx], [data["train_topk_logprobs"][k] for k in idx])
                    if args.kd == "soft" else ()), device=device, prompt_lens=[train_P[k] for k in idx])
                raw.eval()
                with torch.no_grad(), autocast(device, dtype):
                    logits = raw(x)[0]
                    t_logits = teacher(x)[0] if teacher is not None else None
                raw.train()
                plain = loss_by_hand(logits, y, args.kd, topk, args.kd_alpha, args.kd_temperature, t_logits, args.jsd_beta)
                trained = loss_sums(logits, y, args.kd, topk, args.kd_alpha, args.kd_temperature, t_logits,
                                    args.jsd_beta)[0] / (y != -100).sum()
                log(f"the first batch's loss written out (loss_by_hand): {float(plain):.4f}; "
                    f"as the loop computes it (loss_sums): {float(trained):.4f}")
        while step < total_steps:
            epoch, i = divmod(step, steps_per_epoch)
            chunks = chunks_of_epoch(epoch)
            step_chunks = [c[i * args.grad_accum:(i + 1) * args.grad_accum] for c in chunks]  # per rank
            step_tokens = sum(scored[k] for rank_chunks in step_chunks for idx, _ in rank_chunks for k in idx)
            micro = []
            for idx, on_policy in step_chunks[rank]:
                seqs, P = [train[k] for k in idx], [train_P[k] for k in idx]
                if on_policy:  # the student writes the sampled part itself; the teacher will grade it
                    t0 = time.time()
                    seqs = student_samples(raw, seqs, P, args.on_policy_temperature)
                    sampling_time += time.time() - t0
                    sampled_since += sum(len(s) - p for s, p in zip(seqs, P))
                x, y, *topk = make_batch(seqs, *(
                    ([data["train_topk_ids"][k] for k in idx], [data["train_topk_logprobs"][k] for k in idx])
                    if args.kd == "soft" else ()), device=device, prompt_lens=P)
                micro.append((x, y, topk or None))
            if args.on_policy:  # the student's samples have lengths of their own: count, then add up over processes
                mine = torch.tensor(sum(int((y != -100).sum()) for _, y, _ in micro), dtype=torch.float64, device=device)
                if ddp:
                    dist.all_reduce(mine)
                step_tokens = int(mine.item())
            lr = lr_at(step, total_steps, warmup, args.lr, min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr

            loss_sum, ce_sum, norm = train_step(model, optimizer, scaler, micro, step_tokens, device, dtype,
                                                args.grad_clip, args.kd, args.kd_alpha, args.kd_temperature, world,
                                                teacher, args.jsd_beta)

            # the step's mean loss over all its tokens (summed over processes), and whether anyone hit Ctrl-C
            stats = torch.tensor([loss_sum, ce_sum, float(bool(stop_requested))], dtype=torch.float64, device=device)
            if ddp:
                dist.all_reduce(stats)
            loss_val, ce_val = stats[0].item() / step_tokens, stats[1].item() / step_tokens
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"loss became {loss_val} at step {step + 1}")
            step += 1
            steps_this_run += 1
            tokens_since += step_tokens
            history["tokens"] += step_tokens
            history["step"].append(step)
            history["loss"].append(loss_val)
            history["ce"].append(ce_val)
            history["lr"].append(lr)
            history["grad_norm"].append(norm)

            if step % args.log_interval == 0 or step == total_steps:
                sync(device)
                now = time.time()
                n_steps = (step - 1) % args.log_interval + 1
                ms = (now - t_last) / n_steps * 1000
                eta = (now - t_start) / steps_this_run * (total_steps - step)
                # ppl is exp(cross-entropy) on the teacher's tokens, also under --kd soft (where the
                # loss adds the KL term and its exp would be no perplexity)
                log(f"step {step:4d}/{total_steps} | epoch {epoch + 1} | loss {loss_val:.4f} | "
                    f"ppl {math.exp(min(ce_val, 50)):.1f}"
                    f" | lr {lr:.1e} | norm {norm:.2f} | {ms:.0f} ms | {tokens_since / (now - t_last) / 1e3:.1f}k tok/s"
                    + (f" (student sampling {sampled_since / max(sampling_time, 1e-9) / 1e3:.1f}k tok/s)"
                       if sampled_since else "") + f" | eta {fmt_time(eta)}")
                t_last, tokens_since, sampled_since, sampling_time = now, 0, 0, 0.0

            if step % steps_per_epoch == 0:  # end of an epoch: validate, keep the best, save the state
                v = evaluate()
                history["val"].append((step, v))
                improved = v < best_val
                if improved:
                    best_val, best = v, model_checkpoint(raw, "student", val_loss=v, step=step, preset=args.preset)
                save_state()
                log(f"epoch {epoch + 1} | val loss {v:.4f} | val ppl {math.exp(v):.1f}"
                    + (" | best so far" if improved else ""))
            if stats[2].item() and step < total_steps:
                if step % steps_per_epoch:  # (at an epoch end it was just saved)
                    save_state()
                leave()
                raise LessonError(f"interrupted at step {step}: saved {state_path}; continue with --resume")
            if args.stop_after and steps_this_run >= args.stop_after and step < total_steps:
                if step % steps_per_epoch:
                    save_state()
                log(f"stopped after {steps_this_run} steps as asked (--stop-after); wrote {state_path}; "
                    f"continue with --resume")
                leave()
                return
    except KeyboardInterrupt:  # the second Ctrl-C
        raise LessonError(f"stopped at once at step {step}; {state_path} holds the last saved state") from None
    except FloatingPointError as e:
        raise LessonError(f"{e}: stopped without saving it; the last good state ({state_path}) and the earlier "
                          f"student.pt are kept. Try a lower --lr or --dtype fp32") from None
    except torch.cuda.OutOfMemoryError:
        raise LessonError(f"the GPU ran out of memory at step {step} (batch {args.batch_size}): try --batch-size "
                          f"{max(1, args.batch_size // 2)} --grad-accum {args.grad_accum * 2} (same effective "
                          f"batch); checkpoints already written are kept") from None
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous_handler)

    # --- done ---
    wall = wall_before + time.time() - t_start  # all parts of a resumed run
    if best is None:
        raise LessonError("the validation loss was never finite, so there is no student to save: try a lower --lr")
    if master:  # (train_state.pt was saved at the last epoch end: a finished state, step == total_steps)
        save_artifact(best, f"{out}/student.pt")
        last = model_checkpoint(raw, "student", val_loss=history["val"][-1][1], step=step, preset=args.preset)
        save_artifact(last, f"{out}/student_last.pt")
        save_artifact({"kind": "train_log", "preset": args.preset, **history, "settings": vars(args), "dtype": dtype,
                       "world": world, "wall_time": wall, "steps_per_epoch": steps_per_epoch, "best_val": best_val,
                       "allreduces_per_step": (allreduces[0] - allreduces_before) / max(1, steps_this_run)},
                      f"{out}/train_log.pt")
    log(f"trained in {fmt_time(wall)} | {history['tokens']:,} tokens seen | best val loss {best_val:.4f} "
        f"(ppl {math.exp(best_val):.1f}) | wrote {out}/student.pt, student_last.pt, train_log.pt")
    leave()


if __name__ == "__main__":
    run_lesson(main)
