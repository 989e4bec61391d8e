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
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from common.data import batches, make_batch
from common.distill import KD, ONLINE, SAMPLED, loss_sums, stored_targets
from common.model import GPT, logits_fp32, lr_at
from common.plumbing import cli, distributed, train_state
from common.plumbing.artifacts import LessonError, ctrl_c_finishes_the_step, run_lesson
from common.plumbing.device import Precision, deterministic, keep_freed_memory, sync
from common.plumbing.progress import Speedometer
from common.plumbing.train_inputs import (
    load_generated,
    load_student,
    load_teacher,
    longest_sample,
)
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
    flag("--kd", choices=["seq", "soft", *ONLINE], default=KD.kind,
         help="seq: CE on the teacher's text; soft: + its stored distributions; fkl, rkl, jsd, "
              "tvd, skl (skew KL), akl (adaptive KL), eopd (entropy-aware): a divergence to its "
              "full distributions, the teacher running beside the student; rkl-sampled, rkl-vopd "
              "(with a baseline): reverse KL from the teacher's log-prob of each token the "
              "student sampled (need --on-policy 1) (default: seq)")
    flag("--soft-tail", choices=["renorm", "rest", "sampled"], default=KD.tail,
         help="--kd soft: the teacher's top K renormalised (renorm), or with the rest of the "
              "vocabulary as one bucket (rest), or 02's sampled cache (sampled, from "
              "02 --cache-draws); rest and sampled need --kd-temperature 1 (default: renorm)")
    flag("--soft-k", type=cli.nonneg_int, default=KD.k,
         help="--kd soft: use the teacher's k most likely of the K tokens 02 stored (a smaller "
              "cache, for comparing caches at equal bytes; default: 0, all K)")
    flag("--skew", type=cli.unit_float, default=KD.skew,
         help="--kd skl: the teacher's share a of the mixture in KL(p || a p + (1 - a) q), "
              "strictly between 0 and 1 (default: 0.1)")
    flag("--entropy-threshold", type=cli.nonneg_float, default=KD.entropy,
         help="--kd eopd: the teacher's entropy (nats) above which forward KL is added to the "
              "reverse KL (default: 1.0)")
    flag("--jsd-beta", type=cli.unit_float, default=KD.beta,
         help="--kd jsd: beta of the generalized JSD, strictly between 0 and 1 (default: 0.5)")
    flag("--on-policy", type=cli.unit_float, default=0.0,
         help="share of the micro-batches on which the student writes the text and the teacher "
              "grades it (needs an online --kd; default: 0, the teacher's samples only)")
    flag("--on-policy-temperature", type=cli.nonneg_float, default=1.0,
         help="the student's sampling temperature for --on-policy (0: greedy; default: 1.0)")
    flag("--kd-temperature", type=cli.positive_float, default=KD.T,
         help="soft KD: softening temperature T")
    flag("--kd-alpha", type=cli.unit_float, default=KD.alpha,
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
    args = cli.parse(p, PRESETS)
    refuse_misfits(args)
    return args


def refuse_misfits(args):
    """Flags that do not fit together, refused in one line before anything is loaded."""
    if args.kd == "jsd" and not 0 < args.jsd_beta < 1:
        raise LessonError(f"--jsd-beta must be strictly between 0 and 1 (got {args.jsd_beta}); 0 "
                          f"and 1 are --kd fkl and --kd rkl in the limit")
    if args.on_policy and args.kd not in ONLINE:
        raise LessonError(f"--on-policy needs the teacher online to grade the student's text: use "
                          f"it with --kd {', '.join(ONLINE)}, not --kd {args.kd} (which train on "
                          f"the teacher's stored samples)")
    if args.kd in SAMPLED and (args.on_policy != 1 or args.on_policy_temperature != 1):
        raise LessonError(f"--kd {args.kd} needs --on-policy 1 (and --on-policy-temperature 1): "
                          "its estimate of the reverse KL is unbiased only on tokens the student "
                          "drew from itself")
    if args.kd == "skl" and not 0 < args.skew < 1:
        raise LessonError(f"--skew must be strictly between 0 and 1 (got {args.skew}): 0 is "
                          f"--kd fkl, 1 a divergence of 0")
    if args.soft_k and (args.kd != "soft" or args.soft_tail == "sampled"):
        raise LessonError("--soft-k keeps part of the top-K cache: use it with --kd soft and the "
                          "renorm or rest tail")
    if args.soft_tail != "renorm" and (args.kd != "soft" or args.kd_temperature != 1):
        raise LessonError(f"--soft-tail {args.soft_tail} needs --kd soft and --kd-temperature 1: "
                          f"the cache gives the teacher's distribution at T = 1 only")


# --- the losses, written out ---
def loss_by_hand(logits, y, kd, topk=None, teacher_logits=None):
    """The mean loss per scored token, each kind's formula written out plainly (a test checks it
    against common/distill.py's loss_sums, which the loop trains on)."""
    scored = y != -100
    log_q = F.log_softmax(logits.float(), dim=-1)                  # the student's log-probs
    ce = -log_q.gather(-1, y.clamp(min=0)[..., None])[..., 0][scored].mean()  # -log q(teacher's)
    if kd.kind == "seq":
        return ce
    if kd.kind == "soft" and kd.tail == "sampled":  # at T = 1: the draws' frequencies as the target
        ids, counts = topk
        t = counts.float() / counts.float().sum(-1, keepdim=True).clamp(min=1)   # sums to 1
        log_q_t = log_q.gather(-1, ids.long())
        kl = torch.where(t > 0, t * (t.clamp(min=1e-30).log() - log_q_t), 0.0).sum(-1)
        return kd.alpha * kl[scored].mean() + (1 - kd.alpha) * ce
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
        kl = torch.where(p > 0, p * (p.log() - log_q_T), 0.0).sum(-1)  # 0 log 0 = 0
        return kd.alpha * kd.T * kd.T * kl[scored].mean() + (1 - kd.alpha) * ce
    p = F.softmax(teacher_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    q = log_q.exp()
    fkl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)  # sum p (log p - log q), 0 log 0 = 0
    rkl = (q * (log_q - log_p)).sum(-1)                           # sum q (log q - log p)
    if kd.kind == "fkl":
        return fkl[scored].mean()
    if kd.kind == "rkl":
        return rkl[scored].mean()
    if kd.kind == "tvd":                                           # (1/2) sum |p - q|
        return 0.5 * (p - q).abs().sum(-1)[scored].mean()
    if kd.kind == "skl":                               # KL(p || m), m = a p + (1 - a) q
        m = kd.skew * p + (1 - kd.skew) * q
        return torch.where(p > 0, p * (log_p - m.log()), 0.0).sum(-1)[scored].mean()
    if kd.kind == "akl":  # the head: the teacher's top tokens to half its mass; the gap's shares
        p_sorted, order = p.sort(-1, descending=True)
        in_head = (p_sorted.cumsum(-1) - p_sorted) < 0.5
        head = torch.zeros_like(in_head).scatter(-1, order, in_head)
        gap = (p - q).abs().detach()
        w_head = (gap * head).sum(-1) / gap.sum(-1).clamp(min=1e-12)
        return (w_head * fkl + (1 - w_head) * rkl)[scored].mean()
    if kd.kind == "eopd":                        # reverse KL; + forward KL where H(p) > threshold
        entropy = -torch.where(p > 0, p * log_p, 0.0).sum(-1)
        return (rkl + (entropy > kd.entropy) * fkl)[scored].mean()
    if kd.kind in SAMPLED:  # y: the tokens the student wrote; the teacher's log p of each
        log_q_y = log_q.gather(-1, y.clamp(min=0)[..., None])[..., 0]
        log_p_y = log_p.gather(-1, y.clamp(min=0)[..., None])[..., 0]
        reward = (log_q_y - log_p_y).detach()
        baseline = rkl.detach() if kd.kind == "rkl-vopd" else 0   # vOPD: minus the exact RKL
        surrogate = (reward - baseline) * log_q_y  # its gradient, over y ~ q, is the RKL's
        # the value shown is the reverse-KL estimate (reward); the gradient is the surrogate's
        return (surrogate - surrogate.detach() + reward)[scored].mean()
    # jsd: the mixture m, and log(m) of a sum (token_divergence keeps it in log space)
    log_m = (kd.beta * p + (1 - kd.beta) * q).log()
    to_m_from_p = torch.where(p > 0, p * (log_p - log_m), 0.0).sum(-1)  # KL(p || m), 0 log 0 = 0
    to_m_from_q = (q * (log_q - log_m)).sum(-1)                         # KL(q || m)
    return (kd.beta * to_m_from_p + (1 - kd.beta) * to_m_from_q)[scored].mean()


# --- one optimizer step ---
@dataclass
class Setup:
    """What every step of a run uses, fixed when it starts."""
    prec: Precision                 # the device, the dtype and its autocast
    kd: KD                          # what the student learns from the teacher
    teacher: GPT = None             # beside the student, for the online kinds
    grad_clip: float = 1.0          # the gradient norm is clipped to this
    world: int = 1                  # processes training together (DDP averages their gradients)


def train_step(model, optimizer, scaler, micro, step_tokens, setup):
    """One optimizer step over this process's micro-batches [(x, y, topk or None), ...], its loss
    the mean over the step_tokens scored tokens of the WHOLE step (all micro-batches, processes).
    Returns this process's (loss sum, cross-entropy sum) and the gradient norm before clipping."""
    loss_sum = ce_sum = 0.0
    for j, (x, y, topk) in enumerate(micro):
        # DDP averages gradients across processes on every backward; during accumulation only the
        # last micro-batch needs that, so the others skip the communication.
        last = j == len(micro) - 1
        with model.no_sync() if setup.world > 1 and not last else nullcontext():
            with setup.prec.autocast():
                logits, _ = model(x)
                with torch.no_grad():  # (B, L, V) in float32 whatever the autocast dtype
                    teacher_logits = logits_fp32(setup.teacher, x) if setup.kd.online else None
            loss, ce = loss_sums(logits, y, setup.kd, topk, teacher_logits)
            # / step_tokens, not this micro-batch's mean (a short one's tokens weigh more); * world:
            # DDP averages over processes; scaler.scale: fp16's small gradients must not underflow
            scaler.scale(loss * setup.world / step_tokens).backward()
        loss_sum, ce_sum = loss_sum + loss.detach(), ce_sum + ce.detach()  # no wait for the GPU
    scaler.unscale_(optimizer)  # true gradients again before clipping (a no-op without fp16)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, setup.grad_clip)
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


# --- the schedule (the rate's: common/model.py's lr_at) ---
def micro_per_epoch(n, batch_size, world):
    """Micro-batches each process takes an epoch: the same number on every rank."""
    return (math.ceil(n / batch_size) // world) or 1


# --- the epoch's batches ---
def chunks_of_epoch(n, batch_size, seed, epoch, on_policy, world):
    """Every rank's micro-batches of an epoch, each (sample indices, on-policy?): a seeded shuffle
    of the n samples cut into batches, rank r taking every world-th from r (all ranks computed, to
    count)."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    chunks = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    own = (torch.rand(len(chunks), generator=g) < on_policy).tolist()  # after it: 0 keeps the order
    n_micro = micro_per_epoch(n, batch_size, world)
    return [list(zip(chunks[r::world], own[r::world]))[:n_micro] for r in range(world)]


def texts_of(idx, data, kd):
    """The teacher's samples idx of the train split: (texts, prompt lengths, for --kd soft the
    teacher's cache of each: top-K (ids, log-probs) or sampled (ids, counts), else None)."""
    seqs = [data["train"][k] for k in idx]
    P = [data["train_prompt_lens"][k] for k in idx]
    return seqs, P, stored_targets(data, "train", kd, idx) if kd.kind == "soft" else None


def micro_batch(seqs, prompt_lens, topk, device):
    """The micro-batch (x, y, topk or None) of these texts; topk: the teacher's stored (ids,
    log-probs) of each, for --kd soft."""
    x, y, *topk = make_batch(seqs, *(topk or ()), device=device, prompt_lens=prompt_lens)
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


# --- what the run shows ---
@torch.no_grad()
def val_loss(model, data, batch_size, prec):
    """The mean NLL per sampled token of the val texts (prompts not scored), in eval mode; the
    model is handed back in training mode (the caller is training)."""
    model.eval()
    nll, n = 0.0, 0
    for x, y in batches(data["val"], data["val_prompt_lens"], batch_size, prec.device):
        with prec.autocast():
            logits = logits_fp32(model, x)                   # (B, L, V), float32
        nll += loss_sums(logits, y, KD("seq"))[1].item()     # the cross-entropy, summed
        n += int((y != -100).sum())
    model.train()
    return nll / n


def describe_run(args, model, data, procs, setup, schedule):
    """The two lines that say what this run trains, on what, and how."""
    tokens = sum(len(s) - P for s, P in zip(data["train"], data["train_prompt_lens"]))
    tail = {"rest": ", rest bucket", "sampled": ", sampled cache"}.get(args.soft_tail, "")
    tail += f", top {args.soft_k}" if args.soft_k else ""
    kd = (f" (T={args.kd_temperature}, alpha={args.kd_alpha}{tail})" if args.kd == "soft" else
          f" (beta={args.jsd_beta})" if args.kd == "jsd" else
          f" (a={args.skew})" if args.kd == "skl" else
          f" (entropy above {args.entropy_threshold:g} nats)" if args.kd == "eopd" else "")
    if args.on_policy:
        kd += f", on-policy {args.on_policy:g} (T={args.on_policy_temperature:g})"
    scaled = " + GradScaler" if setup.prec.dtype == "fp16" else ""
    steps_per_epoch, warmup = schedule
    return (f"student {model.num_params() / 1e6:.1f}M params | {len(data['train'])} train / "
            f"{len(data['val'])} val samples, {tokens:,} sampled tokens to learn from | "
            f"{procs.device} {setup.prec.dtype}{scaled} | {procs.world} process(es)\n"
            f"kd {args.kd}{kd}{' with the teacher online' if setup.teacher else ''} | "
            f"{args.epochs} epochs x {steps_per_epoch} steps | batch {args.batch_size} x accum "
            f"{args.grad_accum} x {procs.world} | lr {args.lr:.1e}, warmup {warmup}")


def show_first_loss(batch, model, setup, procs):
    """The first batch's loss written out (loss_by_hand) beside the loss the loop trains on
    (loss_sums): the same number."""
    if not procs.master:
        return
    x, y, topk = batch
    model.eval()
    with torch.no_grad(), setup.prec.autocast():
        logits = model(x)[0]
        t_logits = logits_fp32(setup.teacher, x) if setup.teacher is not None else None
    model.train()
    plain = loss_by_hand(logits, y, setup.kd, topk, t_logits)
    trained = loss_sums(logits, y, setup.kd, topk, t_logits)[0] / (y != -100).sum()
    procs.print(f"the first batch's loss written out (loss_by_hand): {float(plain):.4f}; "
                f"as the loop computes it (loss_sums): {float(trained):.4f}")


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
    scaler = prec.scaler()  # enabled for fp16 only

    # --- data, models, optimizer (each misfit refused in one line: plumbing/train_inputs.py) ---
    kd = KD.from_args(args)  # the distillation flags, as one object
    cache = None if kd.kind != "soft" else "sampled" if kd.tail == "sampled" else "topk"
    data = load_generated(f"{args.out}/generated.pt", args.preset, cache)  # the teacher's texts
    if cache == "topk" and kd.k > data["train_topk_ids"][0].size(-1):
        raise LessonError(f"--soft-k {kd.k}: generated.pt keeps the teacher's top "
                          f"{data['train_topk_ids'][0].size(-1)}: use --soft-k up to that")
    init_path = args.init or f"{args.out}/student_init.pt"
    raw, init_ckpt = load_student(init_path, args.preset, args.dropout, longest_sample(data))
    teacher = (load_teacher(f"{args.out}/teacher.pt", longest_sample(data), prec) if kd.online
               else None)
    model = distributed.wrap(raw.to(device), procs)  # in DDP under torchrun
    optimizer = raw.configure_optimizer(args.lr, args.weight_decay, device)  # AdamW
    setup = Setup(prec, kd, teacher, args.grad_clip, procs.world)

    # --- schedule: every rank gets the same number of micro-batches per epoch ---
    n, ga = len(data["train"]), args.grad_accum
    steps_per_epoch = math.ceil(micro_per_epoch(n, args.batch_size, procs.world) / ga)
    total_steps = steps_per_epoch * args.epochs
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, total_steps // 10)

    # --- state: fresh, or from train_state.pt with --resume (common/plumbing/train_state.py) ---
    state = train_state.TrainState(f"{args.out}/train_state.pt",
                                   train_state.settings_of(vars(args), prec.dtype),
                                   init_ckpt["config"], total_steps)
    train_state.start(state, args.resume, procs, raw, optimizer, scaler)
    log(describe_run(args, raw, data, procs, setup, (steps_per_epoch, warmup)))

    # --- the training loop ---
    raw.train()
    first_step, speed = state.step, Speedometer(on_policy=args.on_policy)
    ctrl_c_said = lambda: log(f"\nCtrl-C: finishing step {state.step + 1}, then saving "
                              f"{state.path} (Ctrl-C again to stop at once)")
    with train_state.failures_explained(state, args.batch_size, ga), \
            ctrl_c_finishes_the_step(ctrl_c_said) as ctrl_c:
        if state.step == 0:  # the val loss before training; the first batch's loss written out
            v = val_loss(raw, data, args.batch_size, prec)
            state.history["val"].append((0, v))
            log(f"val before training: loss {v:.4f} | ppl {math.exp(v):.1f}")
            idx, _ = chunks_of_epoch(n, args.batch_size, args.seed, 0, args.on_policy,
                                     procs.world)[0][0]
            show_first_loss(micro_batch(*texts_of(idx, data, kd), device), raw, setup, procs)
        while state.step < total_steps:
            # --- one step: this process's micro-batches (on-policy: the student writes them) ---
            epoch, i = divmod(state.step, steps_per_epoch)
            step_chunks = [c[i * ga:(i + 1) * ga] for c in  # every rank's, to count their tokens
                           chunks_of_epoch(n, args.batch_size, args.seed, epoch, args.on_policy,
                                           procs.world)]
            micro = []
            for idx, own in step_chunks[procs.rank]:
                seqs, P, topk = texts_of(idx, data, kd)
                if own:  # the student continues the teacher's prompts itself, as it is now
                    t0 = time.time()
                    seqs = student_samples(raw, seqs, P, args.on_policy_temperature)
                    speed.sampled(time.time() - t0, sum(len(s) - p for s, p in zip(seqs, P)))
                micro.append(micro_batch(seqs, P, topk, device))
            counts = tokens_of_step(step_chunks, data, micro, args.on_policy, procs)
            lr = lr_at(state.step, total_steps, warmup, args.lr, args.lr * args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, ce_sum, norm = train_step(model, optimizer, scaler, micro, counts["tokens"],
                                                setup)
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
                v = val_loss(raw, data, args.batch_size, prec)
                best = state.keep_if_best(v, raw, args.preset)
                train_state.save(state, procs, raw, optimizer, scaler)
                log(f"epoch {epoch + 1} | val loss {v:.4f} | val ppl {math.exp(v):.1f}"
                    + (" | best so far" if best else ""))
            # --- stop early: Ctrl-C, or --stop-after ---
            asked = args.stop_after and state.step - first_step >= args.stop_after
            if (stop or asked) and state.step < total_steps:
                if state.step % steps_per_epoch:  # (at an epoch end it was just saved)
                    train_state.save(state, procs, raw, optimizer, scaler)
                break

    # --- done: the best student, the last one and the log; or stopped early, to resume ---
    steps_this_run = state.step - first_step
    if state.step == total_steps:  # (train_state.pt is already saved)
        train_state.save_results(state, procs, raw, args.out, {
            "preset": args.preset, "settings": vars(args), "dtype": prec.dtype,
            "steps_per_epoch": steps_per_epoch,
            "allreduces_per_step": procs.allreduces / max(1, steps_this_run)})
    distributed.end(procs)
    if state.step < total_steps and stop:
        raise LessonError(f"interrupted at step {state.step}: saved {state.path}; continue with "
                          f"--resume")
    if state.step < total_steps:
        log(f"stopped after {steps_this_run} steps as asked (--stop-after); wrote {state.path}; "
            f"continue with --resume")


if __name__ == "__main__":
    run_lesson(main, oom="a smaller --batch-size, a larger --grad-accum (the same effective batch)")
