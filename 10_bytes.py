"""Lesson 10: a student with its own tokenizer. The teacher reads GPT-2's 50,257 tokens; this
student reads bytes: 256 of them and an end of text, the same GPT otherwise (03's shape). Every
tokenizer's text is bytes, but the two models now predict different things at different positions,
so the course's losses, two distributions over one vocabulary, no longer apply. Three ways teach it:
  seq        cross-entropy on the bytes of the teacher's texts (sequence-level KD shares nothing)
  uld        + ULD (Boizard et al., 2025): where both have read the same bytes (a token boundary,
             aligned by byte offsets as TRL's GOLD does), the L1 distance between the teacher's
             next-token and the student's next-byte probabilities, each sorted
  projected  + KL to the teacher's distribution projected onto bytes: a byte's probability is the
             mass of the tokens that begin with it, after the bytes of the token already written
beside a token-level student of 03's shape trained by the same loop on the same texts, over
--seeds. All are scored in the one unit that does not depend on how a text is cut, bits per byte,
on the teacher's held-out samples and (tiny teacher) held-out toy-language documents.
docs/bytes.md reads the table.

Reads:  artifacts/teacher.pt, generated.pt
Writes: artifacts/bytes.pt, bytes.md, bytes.png
Run:    python 10_bytes.py          (add --preset tiny for a CPU run of about 2.5 minutes)
"""
import bisect
import itertools
import math
import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from common import toy_language
from common.data import pad_batch
from common.distill import kl
from common.model import GPT, GPTConfig, logits_fp32, lr_at
from common.perplexity import sequences_nll
from common.plumbing.artifacts import (
    LessonError,
    check_preset,
    load_artifact,
    load_model,
    run_lesson,
    save_artifact,
    write_text,
)
from common.plumbing.charts import plt, save_chart
from common.plumbing.cli import (
    lesson_parser,
    names_among,
    parse,
    positive_float,
    positive_int,
    unit_float,
)
from common.plumbing.device import get_device, keep_freed_memory, precision
from common.sampling import generate
from common.tokenizer import EOT, get_tokenizer

# --- settings (flags left unset take the preset's values) ---
BYTE_EOT = 256  # the byte student's end of text: the symbol after the 256 bytes
STUDENT = {"gpt2": dict(n_layer=6, n_embd=512, n_head=8, init_std=0.02),  # 03's PRESETS
           "tiny": dict(n_layer=2, n_embd=32, n_head=2, init_std=0.1)}
# 04's recipe for both; the byte students take more epochs where their steps are cheap: at the tiny
# preset a byte step costs a tenth of a token step (no 50,257-wide output layer), and 6 epochs
# leave them far from done (docs/bytes.md). At the gpt2 preset both cost alike: the same epochs.
PRESETS = {"gpt2": dict(epochs=3, byte_epochs=3, lr=1e-3, batch_size=8, seeds=1),
           "tiny": dict(epochs=6, byte_epochs=24, lr=1e-2, batch_size=4, seeds=3)}
MIN_LR_RATIO, WEIGHT_DECAY, GRAD_CLIP = 0.1, 0.1, 1.0  # 04's defaults
METHODS = ["tokens", "seq", "uld", "projected"]  # "tokens": the token-level student
TOY_DOCUMENTS, TOY_SEED = 60, 3  # lesson 05's held-out toy-language documents
SEED = 1337


def get_args():
    p = lesson_parser(__doc__)
    p.add_argument("--seeds", type=positive_int, help="runs per student, seeds 1337, 1338, ... "
                                                      "(gpt2: 1, tiny: 3)")
    p.add_argument("--epochs", type=positive_int, help="the token student's passes over the "
                                                       "train texts (gpt2: 3, tiny: 6)")
    p.add_argument("--byte-epochs", type=positive_int, help="the byte students' (gpt2: 3, "
                                                            "tiny: 24)")
    p.add_argument("--lr", type=positive_float, help="peak learning rate (gpt2: 1e-3, tiny: 1e-2)")
    p.add_argument("--batch-size", type=positive_int, help="texts per step (gpt2: 8, tiny: 4)")
    p.add_argument("--byte-n-embd", type=positive_int,
                   help="the byte students' width (default: 03's, gpt2: 512, tiny: 32); wider, "
                        "they match the token student's parameters with the embeddings' share")
    p.add_argument("--uld-weight", type=positive_float, default=1.0,
                   help="uld: the ULD term's weight beside the cross-entropy")
    p.add_argument("--kd-alpha", type=unit_float, default=0.5,
                   help="projected: the KL's weight; 1 - alpha: the cross-entropy's (as 04's soft)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"the students to train, comma-separated (default: {','.join(METHODS)})")
    return parse(p, PRESETS)


# --- one text, two tokenizations: the teacher's tokens and the student's bytes ---
def token_bytes(enc):
    """Each token id's bytes; <|endoftext|>'s None (it is not text: the byte student's BYTE_EOT)."""
    return [None if i == EOT else enc.decode_single_token_bytes(i) for i in range(enc.n_vocab)]


def to_bytes(tokens, vocab):
    """A token sequence as the byte student reads it: (its byte symbols, each token's length)."""
    pieces = [[BYTE_EOT] if vocab[t] is None else list(vocab[t]) for t in tokens]
    return [b for piece in pieces for b in piece], [len(piece) for piece in pieces]


def meeting_points(lens_a, lens_b):
    """Where two tokenizations of one text have read the same bytes: pairs (i, j), i and j the
    positions (each tokenization's last token read) whose next predictions start at the same byte.
    GOLD aligns a teacher and a student this way; for a byte student, every token boundary."""
    ends_b = {end: j for j, end in enumerate(itertools.accumulate(lens_b))}
    return [(i, ends_b[end]) for i, end in enumerate(itertools.accumulate(lens_a)) if end in ends_b]


class SortedVocab:
    """A vocabulary sorted by its tokens' bytes: the tokens that begin with the same bytes are then
    one run of the sorted order, and their total probability one difference of a running sum."""

    def __init__(self, vocab):
        self.vocab = vocab  # id -> bytes, or None for an end of text
        self.order = sorted((i for i, b in enumerate(vocab) if b is not None),
                            key=vocab.__getitem__)
        self.sorted = [vocab[i] for i in self.order]
        self.eot = next((i for i, b in enumerate(vocab) if b is None), None)
        self.prefixes, self.table = {}, []  # prefix -> its row of `table`
        self._tensor = (None, None)

    def bounds(self, device):
        """`table` as a tensor on device (made again only when runs were added)."""
        if self._tensor[0] != (len(self.table), str(device)):
            self._tensor = (len(self.table), str(device)), torch.tensor(self.table, device=device)
        return self._tensor[1]

    def runs(self, prefix):
        """The row of the prefix's 257 run bounds: where the tokens continuing it with byte 0, 1,
        ..., 255 begin in the sorted order, and where the last run ends (a token equal to the
        prefix is in none: the text goes on)."""
        if prefix not in self.prefixes:
            stem = prefix.rstrip(b"\xff")  # the first string after all that begin with the prefix
            end = (bisect.bisect_left(self.sorted, stem[:-1] + bytes([stem[-1] + 1])) if stem
                   else len(self.sorted))
            lo = bisect.bisect_left(self.sorted, prefix)
            self.prefixes[prefix] = len(self.table)
            self.table.append([bisect.bisect_left(self.sorted, prefix + bytes([b]), lo, end)
                               for b in range(256)] + [end])
        return self.prefixes[prefix]


def project(p, rows, nodes, first, sv):
    """The teacher's next-token distributions projected onto the next byte: p (N, V) its
    probabilities at N positions; for each of M bytes, the row of p that predicts its token (M,),
    the runs of the token's bytes before it (M,, sv.runs), whether it is the token's first (M,) ->
    (M, 257), the probability of each byte and of the end of text, in float64."""
    # Assumes the text is cut the teacher's way: inside a token only the tokens that begin with its
    # bytes so far count (another cut of the same bytes would add its own share; tests/test_bytes.py
    # measures that against all cuts on a toy vocabulary).
    order = torch.tensor(sv.order, device=p.device)
    ends = F.pad(p.index_select(1, order).double().cumsum(-1), (1, 0))  # (N, V + 1): the mass of
    bounds = sv.bounds(p.device)[nodes]                  # (M, 257)        the sorted tokens < i
    flat = ends.flatten()
    at = flat[rows[:, None] * ends.size(1) + bounds]                     # (M, 257) running sums
    mass = (at[:, 1:] - at[:, :-1]).clamp(min=0)                         # (M, 256) each byte's run
    eot = (p[rows, sv.eot].double() * first if sv.eot is not None
           else torch.zeros_like(mass[:, 0]))
    mass = torch.cat([mass, eot[:, None]], -1)                           # (M, 257)
    return mass / mass.sum(-1, keepdim=True)


def uld(p, q):
    """ULD's distance (Boizard et al., 2025): sum_i |p_(i) - q_(i)| over each side's probabilities
    sorted in decreasing order, the shorter side padded with zeros. p (N, V), q (N, W) -> (N,).
    Blind to which token is which: it matches the shape of the two distributions, not their
    meaning, so it needs no shared vocabulary."""
    k = min(p.size(-1), q.size(-1))
    p_top, q_top = p.topk(k, -1).values, q.topk(k, -1).values
    # the longer side's rest, against zeros: 1 - its top k (so p may be given as its top k alone)
    tail = (1 - p_top.sum(-1)).clamp(min=0) + (1 - q_top.sum(-1)).clamp(min=0)
    return (p_top - q_top).abs().sum(-1) + tail


@dataclass
class Text:
    """One of the teacher's samples in both tokenizations, and what the losses need to pair them."""
    tokens: list       # the teacher's tokens; the first `prompt` were given, not sampled
    prompt: int
    bytes: list        # the same text as bytes; the first `byte_prompt` were given
    byte_prompt: int
    token_of: list     # each scored byte: its token, counted from the first scored token
    node: list         # each scored byte: sv.runs of its token's bytes before it
    meets: list        # the scored bytes that start a token: where both have read the same bytes
    top: torch.Tensor = None        # the teacher's 257 largest probabilities at each scored token
    projected: torch.Tensor = None  # the teacher's byte distribution at each scored byte (M, 257)


def prepare(tokens, prompt, sv):
    """A Text of a token sequence (a list) and its prompt length."""
    byte_ids, lens = to_bytes(tokens, sv.vocab)
    byte_prompt = sum(lens[:prompt])
    token_of, node = [], []
    for j in range(prompt, len(tokens)):
        for k in range(lens[j]):
            token_of.append(j - prompt)
            node.append(sv.runs(sv.vocab[tokens[j]][:k] if sv.vocab[tokens[j]] else b""))
    meets = [b - (byte_prompt - 1) for t, b in meeting_points(lens, [1] * len(byte_ids))
             if prompt - 1 <= t < len(tokens) - 1]
    return Text(tokens, prompt, byte_ids, byte_prompt, token_of, node, meets)


# --- the three ways to teach it ---
def boundaries(texts):
    """The texts' scored bytes, counted over all of them, that start a token (their meets)."""
    offsets = itertools.accumulate([0] + [len(t.token_of) for t in texts])
    return torch.tensor([o + m for o, t in zip(offsets, texts) for m in t.meets], dtype=torch.long)


@torch.no_grad()
def teacher_targets(teacher, texts, sv, prec, batch_size=8):
    """What uld and projected learn from, computed once (the teacher and its texts are fixed): for
    each text, the teacher's top probabilities where each scored token starts, and its projection
    onto every scored byte (CPU, float32)."""
    device = next(teacher.parameters()).device
    for i in range(0, len(texts), batch_size):
        group = texts[i:i + batch_size]
        x, y = pad_batch([t.tokens for t in group], [t.prompt for t in group], device)
        with prec.autocast():
            p = F.softmax(logits_fp32(teacher, x, y != -100), -1)  # (N, V): the scored tokens
        n_tokens = [len(t.tokens) - t.prompt for t in group]
        offsets = itertools.accumulate([0] + n_tokens)
        rows = torch.tensor([o + n for o, t in zip(offsets, group) for n in t.token_of])
        nodes = torch.tensor([n for t in group for n in t.node])
        starts = torch.zeros(len(rows), dtype=torch.bool).index_fill_(0, boundaries(group), True)
        projected = project(p, rows.to(device), nodes.to(device), starts.to(device), sv)
        top = p.topk(BYTE_EOT + 1, -1).values
        for t, t_top, t_projected in zip(group, top.float().cpu().split(n_tokens),
                                         projected.float().cpu().split([len(t.token_of)
                                                                        for t in group])):
            t.top, t.projected = t_top, t_projected


def byte_loss(model, texts, method, args):
    """The mean loss over the texts' scored bytes: cross-entropy, + ULD at the token boundaries
    (uld), or mixed with the KL to the projected teacher (projected)."""
    device = next(model.parameters()).device
    x, y = pad_batch([t.bytes for t in texts], [t.byte_prompt for t in texts], device)
    scored = y != -100
    logits = logits_fp32(model, x, scored)                    # (M, 257): the scored bytes, in order
    ce = F.cross_entropy(logits, y[scored])
    if method == "seq":
        return ce
    log_q = F.log_softmax(logits, -1)
    if method == "uld":  # the teacher's next token against the student's next byte, both sorted
        p_top = torch.cat([t.top for t in texts]).to(device)  # (N, 257)
        q = log_q[boundaries(texts).to(device)].exp()         # (N, 257)
        return ce + args.uld_weight * uld(p_top, q).mean()
    target = torch.cat([t.projected for t in texts]).to(device)  # (M, 257)
    return (1 - args.kd_alpha) * ce + args.kd_alpha * kl(target.log(), log_q).mean()


def token_loss(model, texts, device):
    """The token-level student's loss: cross-entropy on the teacher's tokens (04's --kd seq)."""
    x, y = pad_batch([t.tokens for t in texts], [t.prompt for t in texts], device)
    return F.cross_entropy(logits_fp32(model, x, y != -100), y[y != -100])


def train(model, texts, method, args, prec, seed):
    """04's recipe on the texts: AdamW, a linear warmup then a cosine to lr / 10, the gradient
    clipped, mixed precision as 04 decides it; seeded data order. Returns (seconds, steps)."""
    t0, device = time.time(), prec.device
    epochs = args.epochs if method == "tokens" else args.byte_epochs
    opt = model.configure_optimizer(args.lr, WEIGHT_DECAY, device)
    steps = epochs * math.ceil(len(texts) / args.batch_size)
    warmup, step = max(1, round(steps / 10)), 0  # a tenth of the steps warm up, as in 04
    scaler = prec.scaler()
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(texts), generator=g).tolist()
        for i in range(0, len(texts), args.batch_size):
            batch = [texts[j] for j in order[i:i + args.batch_size]]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, warmup, args.lr, args.lr * MIN_LR_RATIO)
            with prec.autocast():
                loss = (token_loss(model, batch, device) if method == "tokens" else
                        byte_loss(model, batch, method, args))
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)  # clip the true gradient, not the scaled one
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            scaler.step(opt)
            scaler.update()
            step += 1
    model.eval()
    return time.time() - t0, steps


# --- one unit for every model: bits per byte ---
def bits_per_byte(model, seqs, prompt_lens, n_bytes, batch_size=8):
    """A model's summed NLL over its sequences' scored symbols (tokens or bytes), in bits, over
    the bytes they spell: the unit in which models that cut text differently compare."""
    nats, _ = sequences_nll(model, seqs, batch_size, prompt_lens)
    return nats / math.log(2) / n_bytes


def measure(model, sets, prec):
    """bits_per_byte on each held-out set, {name: (seqs, prompt_lens, n_bytes)} in the model's own
    units."""
    with prec.autocast():
        return {name: bits_per_byte(model.to(prec.device), *s) for name, s in sets.items()}


def report(rows, args, sets, times):
    """bytes.md: a row per model, bits per byte mean (min-max) over seeds."""
    names = list(sets)
    head = ["model", "vocabulary", "parameters (embeddings)"] + [f"bits per byte: {n}"
                                                                 for n in names]
    md = ["# A byte-level student\n",
          f"Each student trained by 10_bytes.py --preset {args.preset} (04's recipe: lr "
          f"{args.lr:g}, batch {args.batch_size}; the token student {args.epochs} epochs, the byte "
          f"students {args.byte_epochs}) on the teacher's train texts, seeds "
          f"{SEED}-{SEED + args.seeds - 1}; each cell the mean (min-max) over seeds. Bits per "
          "byte: the summed NLL in bits of the sampled part of each text (tokens or bytes; an end "
          "of text counts as one byte), over its UTF-8 bytes. Lower is better.", "",
          "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for name, r in rows.items():
        cells = [r["vocab"], f"{r['params'] / 1e6:.3f}M ({r['embeddings'] / 1e6:.3f}M)"]
        for n in names:
            v = [run[n] for run in r["runs"]]
            mean = sum(v) / len(v)
            cells.append(f"{mean:.3f}" + (f" ({min(v):.3f}-{max(v):.3f})" if len(v) > 1 else ""))
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    md += ["", "Training time per run (s): " + ", ".join(f"{m} {t:.0f}" for m, t in times.items())]
    return md


def chart(rows, sets, path):
    """Bits per byte of every model on each held-out set: bars the mean, whiskers min-max."""
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4.2), squeeze=False)
    for ax, name in zip(axes[0], sets):
        v = [[run[name] for run in r["runs"]] for r in rows.values()]
        mean = [sum(x) / len(x) for x in v]
        ax.bar(range(len(v)), mean, 0.6, color=["black"] + ["tab:blue"] * (len(v) - 1),
               yerr=[[m - min(x) for m, x in zip(mean, v)], [max(x) - m for m, x in zip(mean, v)]],
               capsize=3)
        names = [n.replace("byte student: ", "bytes: ").replace("token student", "tokens")
                 for n in rows]
        ax.set_xticks(range(len(v)), [f"{n}\n{r['params'] / 1e6:.2f}M"
                                      for n, r in zip(names, rows.values())], fontsize=8)
        ax.set_xlabel("model (parameters)")
        ax.set_ylabel("bits per byte (lower is better)")
        ax.set_title(f"{name}\n(bars: the mean over seeds; whiskers: min-max)")
    save_chart(fig, path)


def main():
    args = get_args()
    out = args.out
    chosen = names_among(args.methods, METHODS, "method")
    heads = STUDENT[args.preset]["n_head"]
    args.byte_n_embd = args.byte_n_embd or STUDENT[args.preset]["n_embd"]
    if args.byte_n_embd % heads:
        raise LessonError(f"--byte-n-embd {args.byte_n_embd}: the {heads} heads split the width "
                          f"evenly: use a multiple of {heads}")
    enc = get_tokenizer()
    for file in ("teacher.pt", "generated.pt"):
        check_preset(load_artifact(f"{out}/{file}", file[:-3]), f"{out}/{file}", args.preset)
    data = load_artifact(f"{out}/generated.pt", "generated",
                         keys=("train", "train_prompt_lens", "test", "test_prompt_lens"))
    teacher, ckpt = load_model(f"{out}/teacher.pt", "teacher", vocab_size=enc.n_vocab)
    prec = precision(get_device())  # the device and the precision, decided once
    if prec.device == "cpu":
        keep_freed_memory()  # as 04: the token student's logits are tens of MB a step
    teacher.to(prec.device)

    # --- the texts in both tokenizations ---
    sv = SortedVocab(token_bytes(enc))
    train_texts = [prepare(s.tolist(), P, sv) for s, P in zip(data["train"],
                                                             data["train_prompt_lens"])]
    held_out = {"teacher's test samples": [prepare(s.tolist(), P, sv) for s, P in
                                           zip(data["test"], data["test_prompt_lens"])]}
    if ckpt.get("language") == "toy":  # every byte after the opening end of text scored, as in 05
        docs = toy_language.documents(TOY_DOCUMENTS, TOY_SEED)
        held_out["toy language"] = [prepare([EOT] + enc.encode(d) + [EOT], 1, sv) for d in docs]
    n_tokens = sum(len(t.tokens) - t.prompt for t in train_texts)
    n_bytes = sum(len(t.bytes) - t.byte_prompt for t in train_texts)
    longest = max(len(t.bytes) for texts in [train_texts, *held_out.values()] for t in texts)
    print(f"{len(train_texts)} train texts: {n_tokens:,} sampled tokens, {n_bytes:,} bytes "
          f"({n_bytes / n_tokens:.2f} bytes a token); the longest text {longest} bytes")
    sets = {kind: {name: ([torch.tensor(getattr(t, units)) for t in texts],
                          [getattr(t, prompt) for t in texts],
                          sum(len(t.bytes) - t.byte_prompt for t in texts))
                   for name, texts in held_out.items()}
            for kind, units, prompt in (("tokens", "tokens", "prompt"),
                                        ("bytes", "bytes", "byte_prompt"))}

    # --- the teacher's targets for uld and projected, once ---
    if {"uld", "projected"} & set(chosen):
        t1 = time.time()
        teacher_targets(teacher, train_texts, sv, prec, args.batch_size)
        print(f"the teacher's targets for uld and projected: {time.time() - t1:.0f}s")

    # --- the students: 03's shape, over GPT-2's tokens or over bytes ---
    def student(method):
        if method == "tokens":
            return GPT(GPTConfig(block_size=teacher.config.block_size, vocab_size=enc.n_vocab,
                                 **STUDENT[args.preset]))
        shape = {**STUDENT[args.preset], "n_embd": args.byte_n_embd}
        return GPT(GPTConfig(block_size=longest, vocab_size=BYTE_EOT + 1, **shape))

    # --- train each student at each seed, and score it ---
    t0 = time.time()
    rows = {"teacher": {"vocab": f"{enc.n_vocab:,} tokens", "params": teacher.num_params(),
                        "embeddings": teacher.transformer.wte.weight.numel(),
                        "runs": [measure(teacher, sets["tokens"], prec)]}}
    times, kept = {}, {}
    for method in chosen:
        name = "token student" if method == "tokens" else f"byte student: {method}"
        runs, seconds = [], []
        for seed in range(SEED, SEED + args.seeds):
            torch.manual_seed(seed)
            model = student(method).to(prec.device)
            took, steps = train(model, train_texts, method, args, prec, seed)
            seconds.append(took)
            runs.append(measure(model, sets["tokens" if method == "tokens" else "bytes"], prec))
            print(f"  {name:<24} seed {seed} | " + " | ".join(
                f"{k} {v:.3f} bits/byte" for k, v in runs[-1].items()) + f" | {seconds[-1]:.0f}s")
        rows[name] = {"vocab": f"{enc.n_vocab:,} tokens" if method == "tokens" else "257 bytes",
                      "params": model.num_params(), "steps": steps,
                      "embeddings": model.transformer.wte.weight.numel(), "runs": runs}
        times[method], kept[method] = sum(seconds) / len(seconds), model

    # --- what a byte student writes: the first test prompt, continued byte by byte ---
    byte_models = [m for m in chosen if m != "tokens"]
    if byte_models:
        t = held_out["teacher's test samples"][0]
        prompt = torch.tensor([t.bytes[:t.byte_prompt]], device=prec.device)
        torch.manual_seed(SEED)
        model = kept[byte_models[-1]]
        room = model.config.block_size - prompt.size(1)
        with prec.autocast():
            text = generate(model, prompt, room, eos_token=BYTE_EOT)[0].tolist()
        text = bytes(b for b in text[1:] if b != BYTE_EOT).decode("utf-8", errors="replace")
        print(f"\nthe byte student ({byte_models[-1]}) continues a test prompt:\n  {text!r}")

    # --- the report ---
    md = report(rows, args, sets["tokens"], times)
    write_text("\n".join(md) + "\n", f"{out}/bytes.md")
    save_artifact({"kind": "bytes", "preset": args.preset, "rows": rows, "seeds": args.seeds},
                  f"{out}/bytes.pt")
    chart(rows, sets["tokens"], f"{out}/bytes.png")
    print("\n" + "\n".join(md[3:]))
    print(f"\nbytes finished in {time.time() - t0:.0f}s | wrote {out}/bytes.md, bytes.png, "
          f"bytes.pt")


if __name__ == "__main__":
    run_lesson(main, oom="a smaller --batch-size")
