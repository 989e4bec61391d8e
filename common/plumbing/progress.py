"""What a training run prints: the lines that describe it, and one log line per interval with the
loss, the learning rate, the speed and the time left."""
import math
import time
from dataclasses import dataclass, field

import torch

from common.model import logits_fp32
from common.plumbing.device import autocast


def fmt_time(s):
    """Seconds as 42s or 3m05s."""
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"


def describe_run(args, model, data, procs, dtype, scaler, online, steps_per_epoch, warmup):
    """The two lines that say what this run of lesson 04 trains, on what, and how."""
    tokens = sum(len(s) - P for s, P in zip(data["train"], data["train_prompt_lens"]))
    tail = ", rest bucket" if args.soft_tail == "rest" else ""
    kd = (f" (T={args.kd_temperature}, alpha={args.kd_alpha}{tail})" if args.kd == "soft" else
          f" (beta={args.jsd_beta})" if args.kd == "jsd" else "")
    if args.on_policy:
        kd += f", on-policy {args.on_policy:g} (T={args.on_policy_temperature:g})"
    return (f"student {model.num_params() / 1e6:.1f}M params | {len(data['train'])} train / "
            f"{len(data['val'])} val samples, {tokens:,} sampled tokens to learn from | "
            f"{procs.device} {dtype}{' + GradScaler' if scaler.is_enabled() else ''} | "
            f"{procs.world} process(es)\n"
            f"kd {args.kd}{kd}{' with the teacher online' if online else ''} | {args.epochs} "
            f"epochs x {steps_per_epoch} steps | batch {args.batch_size} x accum {args.grad_accum} "
            f"x {procs.world} | lr {args.lr:.1e}, warmup {warmup}")


def show_first_loss(history, batch, model, teacher, procs, dtype, by_hand, sums, kd):
    """Print the val loss before training, and the first batch's loss written out (by_hand: 04's
    loss_by_hand) beside the loss the loop trains on (sums: its loss_sums): the same number."""
    v = history["val"][-1][1]
    procs.print(f"val before training: loss {v:.4f} | ppl {math.exp(v):.1f}")
    if not procs.master:
        return
    x, y, topk = batch
    model.eval()
    with torch.no_grad(), autocast(procs.device, dtype):
        logits = model(x)[0]
        t_logits = logits_fp32(teacher, x) if teacher is not None else None
    model.train()
    plain = by_hand(logits, y, kd, topk, t_logits)
    trained = sums(logits, y, kd, topk, t_logits)[0] / (y != -100).sum()
    procs.print(f"the first batch's loss written out (loss_by_hand): {float(plain):.4f}; "
                f"as the loop computes it (loss_sums): {float(trained):.4f}")


@dataclass
class Speedometer:
    """Time and tokens since the last log line, and the student's own sampling (--on-policy)."""
    started: float = field(default_factory=time.time)  # this run's start, for the eta
    last: float = field(default_factory=time.time)     # the last log line
    tokens: int = 0                # tokens trained on since then
    sampled_time: float = 0.0      # seconds the student spent writing on-policy text
    sampled_tokens: int = 0        # and the tokens it wrote
    on_policy: float = 0.0         # --on-policy: whose tokens the logged perplexity is on

    def sampled(self, seconds, tokens):
        self.sampled_time += seconds
        self.sampled_tokens += tokens

    def line(self, state, total_steps, epoch, interval, first_step):
        """The log line of the step just done (call after a device sync); resets the counts."""
        now, h = time.time(), state.history
        n_steps = (state.step - 1) % interval + 1
        eta = (now - self.started) / (state.step - first_step) * (total_steps - state.step)
        rate = self.sampled_tokens / max(self.sampled_time, 1e-9) / 1e3
        sampling = f" (student sampling {rate:.1f}k tok/s)" if self.sampled_tokens else ""
        # ppl is exp(cross-entropy) on the step's tokens, also under --kd soft (where the loss
        # adds the KL term and its exp would be no perplexity): the teacher's tokens, or with
        # --on-policy the student's own (then it says so: no measure of imitation)
        whose = ("" if not self.on_policy else " on own text" if self.on_policy == 1 else
                 " on own + teacher text")
        text = (f"step {state.step:4d}/{total_steps} | epoch {epoch + 1} | loss "
                f"{h['loss'][-1]:.4f} | ppl{whose} {math.exp(min(h['ce'][-1], 50)):.1f} | lr "
                f"{h['lr'][-1]:.1e} | norm {h['grad_norm'][-1]:.2f} | "
                f"{(now - self.last) / n_steps * 1000:.0f} ms | "
                f"{self.tokens / (now - self.last) / 1e3:.1f}k tok/s{sampling} | "
                f"eta {fmt_time(eta)}")
        self.last, self.tokens, self.sampled_tokens, self.sampled_time = now, 0, 0, 0.0
        return text
