"""What a training run prints once per interval: the loss, the learning rate, the speed and the
time left."""
import math
import time
from dataclasses import dataclass, field


def fmt_time(s):
    """Seconds as 42s or 3m05s."""
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"


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
