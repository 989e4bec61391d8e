"""Every line the tiny course prints that carries a number, lesson by lesson, is recomputed here from
what the lessons saved or from the models themselves; a line with a number that no check claims
fails its lesson's test. A number printed beside a measurement is read by a learner as a result:
a wrong row, denominator or seed there is a wrong result, however right the artifact beside it.

The course is the one course.ipynb runs on the tiny preset (conftest's `course`). Times and speeds
cannot be recomputed; their lines are checked for what does not depend on the clock (the counts
beside them, an eta that agrees with the elapsed time).
"""
import math
import os
import re
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import cell_text  # noqa: E402

LESSONS = ("01", "02", "03", "04", "05", "06")


class Printed:
    """The lines of one part of the course's output that carry a digit; each check claims the lines
    it recomputes, and `unclaimed()` lists the ones no check read."""

    def __init__(self, text):
        self.text = text
        self.lines = [ln for ln in text.splitlines() if re.search(r"\d", ln)]
        self.claimed = set()

    def line(self, expected):
        """The line equal to expected (as printed, leading spaces too), claimed."""
        assert expected in self.lines, f"not printed: {expected!r}"
        self.claimed.add(self.lines.index(expected))

    def lines_like(self, pattern, count=None):
        """The matches of every line that pattern matches whole, claimed (count of them, if given)."""
        found = [(i, re.fullmatch(pattern, ln)) for i, ln in enumerate(self.lines)]
        found = [(i, m) for i, m in found if m]
        assert found and (count is None or len(found) == count), (pattern, len(found), count)
        self.claimed.update(i for i, _ in found)
        return [m for _, m in found]

    def unclaimed(self):
        return [ln for i, ln in enumerate(self.lines) if i not in self.claimed]


def printed(course, part):
    """Printed: what the cells of one part of the executed notebook printed ("setup": the cells
    before lesson 01; "01".."06": a lesson's cells, the ones after 06 with it)."""
    nb = course[2]
    starts = [next(i for i, c in enumerate(nb.cells) if c.source.startswith(f"## Lesson {n}:"))
              for n in LESSONS] + [len(nb.cells)]
    if part == "setup":
        cells = nb.cells[:starts[0]]
    else:
        k = LESSONS.index(part)
        cells = nb.cells[starts[k]:starts[k + 1]]
    return Printed("".join(cell_text(c) for c in cells if c.cell_type == "code"))


def within(value, printed_value, decimals):
    """printed_value is value rounded to decimals, where value was recomputed here by another path
    (another order of sums: 1e-5 of it either way, so that a value on a rounding edge passes)."""
    return abs(value - float(printed_value.replace(",", ""))) <= 0.5 * 10 ** -decimals + 1e-5 * abs(value)


def plain_ppl(model, seqs, prompt_lens):
    """exp of the mean -log p of each sampled token (from the prompt's end on), every sequence in one
    forward pass of the full softmax: (perplexity, tokens scored). No code of common/perplexity.py."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for s, P in zip(seqs, prompt_lens):
            logp = torch.log_softmax(model(s[None, :-1])[0][0].float(), -1)
            nll -= float(logp[torch.arange(P - 1, len(s) - 1), s[P:]].sum())
            n += len(s) - P
    return math.exp(nll / n), n


def artifacts(out):
    from common.plumbing.artifacts import load_artifact, load_model
    models = {name: load_model(str(out / f"{name}.pt"), ("student_init", "student", "teacher"))
              for name in ("teacher", "student_init", "student")}
    return models, load_artifact(str(out / "generated.pt"), "generated")


def test_the_setup_cell_says_the_device_and_precision_lesson_04_will_use(course):
    from common.plumbing.device import get_device, pick_dtype
    p = printed(course, "setup")
    device = get_device()
    p.line(f"preset: tiny | artifacts in: artifacts | device: {device} | trains in {pick_dtype(device)}")
    assert not p.unclaimed()


def test_01s_printed_lines_are_its_teacher_and_its_language(course):
    """The training lines' steps and eta, the tokens the language uses, the source, the spec, the
    held-out perplexity and the floor beside it (recomputed from teacher.pt and the language)."""
    from common import toy_language
    from common.plumbing.artifacts import load_model
    from common.tokenizer import EOT, get_tokenizer
    out, _, _ = course
    p, enc = printed(course, "01"), get_tokenizer()
    teacher, ckpt = load_model(str(out / "teacher.pt"), "teacher")
    t = teacher.config
    steps = p.lines_like(r"  step +(\d+)/(\d+) \| loss ([\d.]+) nats/token \| (\d+)s \| eta (\d+)s", count=10)
    total = int(steps[0][2])
    assert f"trained {total} steps" in ckpt["source"]
    assert [int(m[1]) for m in steps] == [total // 10 * k for k in range(1, 11)]
    for m in steps:  # eta = the time so far / steps so far x steps left; both rounded to seconds
        step, seconds, eta = int(m[1]), int(m[4]), int(m[5])
        left = (total - step) / step
        assert (seconds - 0.5) * left - 0.5 <= eta <= (seconds + 0.5) * left + 0.5, m[0]
    assert float(steps[-1][3]) < float(steps[0][3])  # it learned; each loss's formula: the test below
    p.line(f"training the tiny teacher on the toy language ({total} steps):")
    p.line(f"  the language uses {len(toy_language.used_tokens(enc.encode, EOT))} of the {t.vocab_size:,} "
           f"GPT-2 tokens")
    ready = p.lines_like(re.escape(f"teacher: {ckpt['source']}, ready in ") + r"([\d.]+)s", count=1)[0]
    assert float(ready[1]) >= int(steps[-1][4]) - 0.5  # ready after its last step
    p.line(f"  parameters {teacher.num_params() / 1e6:.1f}M ({teacher.num_params(False) / 1e6:.1f}M without "
           f"embeddings) | layers {t.n_layer} | width {t.n_embd} | heads {t.n_head} | context "
           f"{t.block_size} | vocab {t.vocab_size}")
    docs = toy_language.documents(20, 2)  # 01's held-out seed (the teacher trained on seed 1's stream)
    texts = [torch.tensor([EOT] + enc.encode(d) + [EOT]) for d in docs]
    ppl, _ = plain_ppl(teacher, texts, [1] * len(texts))
    floor = math.exp(toy_language.entropy_per_token(docs, enc.encode))
    m = p.lines_like(r"  perplexity on 20 held-out toy documents: ([\d.]+)  \(the language's own -log p on "
                     r"them gives ([\d.]+), what a model knowing the language exactly would score; its "
                     r"entropy rate over 2,000 documents gives ([\d.]+); a uniform guess ([\d,]+)\)", count=1)[0]
    assert within(ppl, m[1], 2) and m[1] == f"{ckpt['sanity']['passage_ppl']:.2f}"
    assert within(floor, m[2], 2) and m[2] == f"{ckpt['sanity']['floor']:.2f}"
    assert m[3] == f"{math.exp(toy_language.ENTROPY_RATE):.2f}" and m[4] == f"{t.vocab_size:,}"
    assert not p.unclaimed()


def test_the_tiny_teachers_printed_loss_is_the_full_softmax_loss_of_each_logged_batch():
    """toy_language.train_on_toy_language trains on the used tokens' logits only; each loss it prints
    is the full softmax's cross-entropy on that step's batch (rebuilt here from the same seed),
    measured before the step, at the steps it logs, and its rate follows warmup then cosine."""
    import random

    from common import toy_language
    from common.model import GPT, GPTConfig
    from common.tokenizer import EOT, get_tokenizer
    enc = get_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_embd=16))
    rng, expected, rates, lines = random.Random(1), [], [], []
    real_clip = torch.nn.utils.clip_grad_norm_

    def before_each_step(params, max_norm, *a, **k):  # after backward, before the optimiser's step
        tokens = torch.tensor(toy_language.token_stream(rng, 4 * 17, enc.encode, EOT)[:4 * 17]).view(4, 17)
        with torch.no_grad():
            logits = model(tokens[:, :-1])[0]
        expected.append(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())))
        rates.append(opt_lr[0]())
        return real_clip(params, max_norm, *a, **k)
    opt_lr = []
    real_adamw = torch.optim.AdamW

    def adamw(*a, **k):
        opt = real_adamw(*a, **k)
        opt_lr.append(lambda: opt.param_groups[0]["lr"])
        return opt
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.utils, "clip_grad_norm_", before_each_step)
        mp.setattr(torch.optim, "AdamW", adamw)
        used = toy_language.train_on_toy_language(model, 30, enc.encode, EOT, batch_size=4, lr=1e-2,
                                                  log=lines.append)
    assert used == len(toy_language.used_tokens(enc.encode, EOT))
    assert len(lines) == 10 and len(expected) == 30
    for k, ln in enumerate(lines):
        step = 3 * (k + 1)
        m = re.fullmatch(r"  step +(\d+)/30 \| loss ([\d.]+) nats/token \| \d+s \| eta \d+s", ln)
        assert m and int(m[1]) == step and within(expected[step - 1], m[2], 3), (ln, expected[step - 1])
    for step, lr in enumerate(rates):
        assert lr == pytest.approx(1e-2 * min(1, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / 30))))


def test_02s_printed_lines_are_its_teacher_its_samples_and_its_splits(course):
    """The teacher line; the prompts line (its openings counted from the splits); one step by hand
    and the soft targets, recomputed from the teacher's own logits after the first opening; each
    batch line's count and the totals; the filter's counts; the split line."""
    from common import toy_language
    from common.tokenizer import EOT, get_tokenizer
    out, _, _ = course
    p, enc = printed(course, "02"), get_tokenizer()
    models, data = artifacts(out)
    (teacher, ckpt), s = models["teacher"], data["settings"]
    p.line(f"teacher: {ckpt['source']} | {teacher.num_params() / 1e6:.1f}M params | cpu fp32")
    openings = set().union(*(data[f"{n}_openings"] for n in ("train", "val", "test")))
    assert openings == set(toy_language.OPENINGS)  # "mixed": every opening, and unconditional samples
    p.line(f"prompts: {s['prompts']} ({len(openings)} topic openings) | {s['num_samples']} samples x "
           f"{s['max_new_tokens']} new tokens | T={s['temperature']} top-k={s['top_k']} top-p={s['top_p']}")
    # one step by hand, recomputed from the teacher's logits after the first opening
    opening = enc.encode(toy_language.OPENINGS[0])
    with torch.no_grad():
        logits = teacher(torch.tensor([[EOT] + opening]))[0][0, -1].float()
    top, ids = torch.topk(logits / s["temperature"], s["top_k"])
    probs = torch.softmax(top, -1)
    nucleus = int(((probs.cumsum(-1) - probs) < s["top_p"]).sum())  # kept while the mass above < top-p
    q = probs[:nucleus] / probs[:nucleus].sum()
    likeliest = ", ".join(re.escape(repr(enc.decode([int(i)]))) + r" ([\d.]+)" for i in ids[:5])
    m = p.lines_like(re.escape(f"one step by hand after {toy_language.OPENINGS[0]!r}: {nucleus} of the top "
                               f"{s['top_k']} tokens are in the top-p {s['top_p']} nucleus; the likeliest ")
                     + likeliest + r"; drew ('.*?') \(sample_next, same seed: ('.*?')\)", count=1)[0]
    assert all(within(float(v), m[k + 1], 2) for k, v in enumerate(q[:5]))
    assert m[6] == m[7] and m[6] in [repr(enc.decode([int(i)])) for i in ids[:nucleus]]
    # the soft targets at T = 1 and T = 2, and every other token's share
    p1, p2 = torch.softmax(logits, -1), torch.softmax(logits / 2, -1)
    soft = data["soft_targets"]  # what 02 saved, and printed: the teacher's at that position
    assert soft["T"] == 2 and soft["context"] == [EOT] + opening
    assert soft["p_T1"] == pytest.approx(p1[soft["ids"]].tolist(), rel=1e-4)
    assert soft["p_T"] == pytest.approx(p2[soft["ids"]].tolist(), rel=1e-4)
    assert soft["p_T1"] == sorted(soft["p_T1"], reverse=True) and len(soft["ids"]) == 10
    assert soft["p_T1"][-1] >= float(p1.topk(11).values[-1]) * (1 - 1e-5)  # the 10 likeliest
    for i, a, b in zip(soft["ids"], soft["p_T1"], soft["p_T"]):
        p.line(f"  {enc.decode([i])!r:<14}{a:>8.3f}{b:>8.3f}")
    m = p.lines_like(rf"  the other {len(p1) - 10:,} +([\d.]+) +([\d.]+)", count=1)[0]
    assert within(1 - sum(soft["p_T1"]), m[1], 3) and within(1 - sum(soft["p_T"]), m[2], 3)
    p.line(f"soft targets after {toy_language.OPENINGS[0]!r}: the teacher's top 10 next tokens")
    p.line(f"  {'token':<14}{'T=1':>8}{'T=2':>8}")
    # the batches, the totals, the filter
    n, bs = s["num_samples"], s["batch_size"]
    batches = math.ceil(n / bs)
    shown = [b for b in range(1, batches + 1) if b % max(1, batches // 5) == 0 or b == batches]
    got = p.lines_like(r"  batch +(\d+)/(\d+) \| +(\d+) samples \| ([\d,]+) tok/s", count=len(shown))
    assert [(int(m[1]), int(m[2]), int(m[3])) for m in got] == [(b, batches, min(b * bs, n)) for b in shown]
    kept = [(x, P) for name in ("train", "val", "test") for x, P in zip(data[name], data[f"{name}_prompt_lens"])]
    dropped = data["dropped"]
    assert len(kept) + sum(dropped.values()) == n
    p.line(f"kept {len(kept)} of {n} | dropped: " + ", ".join(f"{v} {k}" for k, v in dropped.items()))
    new = sum(len(x) - P for x, P in kept)
    m = p.lines_like(rf"generated {n} samples, ([\d,]+) new tokens in ([\d.]+)s \(([\d,]+) tokens/s\)", count=1)[0]
    if not sum(dropped.values()):  # every sample kept: the new tokens are the splits' sampled ones
        assert m[1] == f"{new:,}"
    rate, seconds = float(m[3].replace(",", "")), float(m[2])
    assert m[3] == f"{data['tokens_per_second']:,.0f}"
    assert int(m[1].replace(",", "")) / (seconds + 0.05) - 1 <= rate <= int(m[1].replace(",", "")) / (seconds - 0.05) + 1
    if s["topk_logits"] or s["cache_draws"]:  # what one position of each cache costs
        line = [f"top-{s['topk_logits']}: {s['topk_logits'] * 6} bytes (an int32 id and a float16 log-prob each)"]
        if s["cache_draws"]:
            counts = [c for name in ("train", "val", "test") for c in data[f"{name}_sampled_counts"]]
            distinct = torch.cat([(c > 0).sum(-1) for c in counts]).float().mean()
            line.append(f"sampled, {s['cache_draws']} draws: {distinct:.1f} distinct ids, {distinct * 5:.0f} "
                        f"bytes (an int32 id and a uint8 count each)")
        p.line("teacher's cache a position: " + " | ".join(line[0 if s["topk_logits"] else 1:]))
    tokens = sum(len(x) for x, _ in kept)
    p.line(" | ".join(f"{name} {len(data[name])} samples ({len(data[f'{name}_openings'])} openings)"
                      for name in ("train", "val", "test"))
           + f" | {tokens:,} tokens, {new:,} of them sampled (mean {tokens / len(kept):.0f} per sample)")
    # a look at the data: the first three training texts, each after a "---"
    shown = ["  ---\n  " + t.replace("<|endoftext|>", "").strip()[:300].replace("\n", "\n  ") + "\n"
             for t in data["train_texts"][:3]]
    assert p.text.count("  ---\n") == 3 and "".join(shown) in p.text
    assert not p.unclaimed()


def test_03s_printed_table_and_compression_are_its_two_models(course):
    out, _, _ = course
    p = printed(course, "03")
    models, _ = artifacts(out)
    teacher, student = models["teacher"][0], models["student_init"][0]
    t, s = teacher.config, student.config
    for label, a, b in (("parameters", f"{teacher.num_params() / 1e6:.1f}M", f"{student.num_params() / 1e6:.1f}M"),
                        ("  without embeddings", f"{teacher.num_params(False) / 1e6:.2f}M",
                         f"{student.num_params(False) / 1e6:.2f}M"),
                        ("layers x width (n_embd)", f"{t.n_layer} x {t.n_embd}", f"{s.n_layer} x {s.n_embd}"),
                        ("heads (head size)", f"{t.n_head} ({t.n_embd // t.n_head})", f"{s.n_head} ({s.n_embd // s.n_head})"),
                        ("context / vocabulary", f"{t.block_size} / {t.vocab_size}", f"{s.block_size} / {s.vocab_size}"),
                        ("MB on disk (fp32; fp16 half)", f"{teacher.num_params() * 4e-6:.0f}",
                         f"{student.num_params() * 4e-6:.0f}")):
        p.line(f"{label:<28}{a:>16}{b:>16}")
    p.line(f"compression: {teacher.num_params() / student.num_params():.1f}x fewer parameters "
           f"({teacher.num_params(False) / student.num_params(False):.1f}x in the transformer blocks; the "
           f"{t.vocab_size:,}-token embedding is a large share of a small model)")
    assert not p.unclaimed()


def test_04s_printed_lines_are_its_run_and_its_log(course):
    """The run's description, the first batch's loss both ways, each log line's loss, rate and norm
    against train_log.pt, each epoch's val loss and whether it was the best so far, and the closing
    line's tokens (epochs x the sampled tokens) and best val loss."""
    from common.plumbing.artifacts import load_artifact
    from common.plumbing.progress import fmt_time
    out, _, _ = course
    p = printed(course, "04")
    models, data = artifacts(out)
    student = models["student_init"][0]
    log = load_artifact(str(out / "train_log.pt"), "train_log")
    st, per_epoch = log["settings"], log["steps_per_epoch"]
    total = per_epoch * st["epochs"]
    tokens = sum(len(x) - P for x, P in zip(data["train"], data["train_prompt_lens"]))
    assert per_epoch == math.ceil(len(data["train"]) / st["batch_size"]) and st["grad_accum"] == 1
    p.line(f"student {student.num_params() / 1e6:.1f}M params | {len(data['train'])} train / {len(data['val'])} "
           f"val samples, {tokens:,} sampled tokens to learn from | cpu fp32 | 1 process(es)")
    p.line(f"kd seq | {st['epochs']} epochs x {per_epoch} steps | batch {st['batch_size']} x accum 1 x 1 | "
           f"lr {st['lr']:.1e}, warmup {max(1, total // 10)}")
    assert st["dropout"] == 0 and log["step"][0] == 1  # so step 1's loss is the first batch's, before any update
    first = f"{log['loss'][0]:.4f}"
    p.line(f"the first batch's loss written out (loss_by_hand): {first}; as the loop computes it (loss_sums): {first}")
    lines = p.lines_like(r"step +(\d+)/(\d+) \| epoch (\d+) \| loss ([\d.]+) \| ppl ([\d.]+) \| lr ([\d.e+-]+) \| "
                         r"norm ([\d.]+) \| \d+ ms \| [\d.]+k? tok/s \| eta (\d+m)?\d+s", count=math.ceil(total / 10))
    assert [int(m[1]) for m in lines] == [*range(10, total + 1, 10)] + ([total] if total % 10 else [])
    for m in lines:
        k = log["step"].index(int(m[1]))
        assert int(m[2]) == total and int(m[3]) == (int(m[1]) - 1) // per_epoch + 1
        assert m.group(4, 5, 6, 7) == (f"{log['loss'][k]:.4f}", f"{math.exp(log['ce'][k]):.1f}",
                                       f"{log['lr'][k]:.1e}", f"{log['grad_norm'][k]:.2f}")
    p.line(f"val before training: loss {log['val'][0][1]:.4f} | ppl {math.exp(log['val'][0][1]):.1f}")
    best = math.inf
    for epoch, (step, v) in enumerate(log["val"][1:], 1):
        assert step == epoch * per_epoch
        p.line(f"epoch {epoch} | val loss {v:.4f} | val ppl {math.exp(v):.1f}" + (" | best so far" if v < best else ""))
        best = min(best, v)
    assert log["best_val"] == best and log["tokens"] == st["epochs"] * tokens
    p.line(f"trained in {fmt_time(log['wall_time'])} | {st['epochs'] * tokens:,} tokens seen | best val loss "
           f"{best:.4f} (ppl {math.exp(best):.1f}) | wrote artifacts/student.pt, student_last.pt, train_log.pt")
    assert not p.unclaimed()


def test_05s_printed_lines_are_its_three_models_measured_again(course):
    """The sets line; the by-hand line; each model's perplexity on each set and its tokens, measured
    again here with a plain full softmax; the table and the floor; top-1 agreement, counted again,
    and the KL eval.pt holds; the sampling settings and what was skipped."""
    from common import toy_language
    from common.plumbing.artifacts import load_artifact
    from common.tokenizer import EOT, get_tokenizer
    out, _, _ = course
    p, enc = printed(course, "05"), get_tokenizer()
    models, data = artifacts(out)
    ev, s = load_artifact(str(out / "eval.pt"), "eval"), data["settings"]
    test, P = data["test"], data["test_prompt_lens"]
    docs = toy_language.documents(60, 3)  # 05's toy-language set
    toy = [torch.tensor([EOT] + enc.encode(d) + [EOT]) for d in docs]
    assert max(len(d) for d in toy) <= ev["window"]  # each document in one window: one forward pass each
    sampled = sum(len(x) - n for x, n in zip(test, P))
    p.line(f"sets: generated-test ({len(test)} samples, {sampled:,} sampled tokens), toy-language (60 documents) | "
           f"window {ev['window']}, stride {ev['stride']} | cpu fp32")
    one, n_one = plain_ppl(models["teacher"][0], test[:1], P[:1])
    m = p.lines_like(rf"by hand, the teacher on test sample 0 \({n_one} sampled tokens\): perplexity ([\d.]+); "
                     r"common/perplexity.py: ([\d.]+)", count=1)[0]
    assert within(one, m[1], 3) and within(one, m[2], 3)
    sets = {"generated-test": (test, P), "toy-language": (toy, [1] * len(toy))}
    for set_name, (seqs, lens) in sets.items():
        for name, (model, _) in models.items():
            ppl, n = plain_ppl(model, seqs, lens)
            assert ev["perplexity"][set_name][name] == pytest.approx(ppl, rel=1e-4), (set_name, name)
            p.lines_like(rf"  {set_name:<16} {name:<13} ppl {ev['perplexity'][set_name][name]:>12,.2f}  "
                         rf"\({n:,} tokens, [\d.]+s\)", count=1)
        row = ev["perplexity"][set_name]
        p.line(f"{set_name:<18}{row['teacher']:>12,.2f}{row['student_init']:>14,.2f}{row['student']:>12,.2f}"
               + (f"{ev['floor'][set_name]:>10.2f}" if set_name in ev["floor"] else ""))
    assert ev["floor"]["toy-language"] == pytest.approx(math.exp(toy_language.entropy_per_token(docs, enc.encode)))
    p.lines_like(r"\(floor: exp of the toy language's own -log p per token on this set, .*; no model beats it in "
                 rf"expectation. The language's entropy rate, estimated over 2,000 documents: "
                 rf"{math.exp(toy_language.ENTROPY_RATE):.2f}\)", count=1)
    p.line("on generated-test  top-1 agreement with teacher   top-K truncated KL(teacher || model)")
    for name, (model, _) in models.items():  # the model's likeliest token against the teacher's top-1
        agree = total = 0
        with torch.no_grad():
            for x, n, ids in zip(test, P, data["test_topk_ids"]):
                guess = model(x[None, :-1])[0][0].argmax(-1)[n - 1:]
                teacher_top = ids[n - 1:, 0]  # ids: (len - 1, K), the teacher's top K after each position
                agree += int((guess == teacher_top.to(guess.dtype)).sum())
                total += len(guess)
        assert abs(ev["agreement"][name] - agree / total) <= 1.01 / total, name  # a near tie may flip one
        note = ("  (the teacher itself: 100%, and not 0: the cost of keeping only its top K)"
                if name == "teacher" else "")
        p.line(f"  {name:<16}{ev['agreement'][name]:>14.1%}{ev['kl'][name]:>28.4f}{note}")
    p.lines_like(re.escape(f"(the teacher's generated-test perplexity is low partly by construction: it sampled those "
                           f"tokens with T={s['temperature']}, top-k {s['top_k']}, top-p {s['top_p']}; ") + ".*",
                 count=1)
    for set_name, why in ev["skipped"].items():
        p.line(f"skipped {set_name}: {why}")
    assert not p.unclaimed()


def test_06s_printed_lines_are_eval_pt_its_rates_and_its_report(course):
    """Each summary line's perplexities and rates (from their definitions, not 06's code), the
    compression and the speeds its report.md holds, and the archive's size."""
    out, _, _ = course
    p = printed(course, "06")
    from common.plumbing.artifacts import load_artifact
    ev = load_artifact(str(out / "eval.pt"), "eval")
    models, _ = artifacts(out)
    for set_name, r in ev["perplexity"].items():
        t, before, after = r["teacher"], r["student_init"], r["student"]
        gap = (math.log(before) - math.log(after)) / (math.log(before) - math.log(t))
        p.line(f"{set_name:<16} ppl teacher {t:,.2f} | student {before:,.2f} -> {after:,.2f} | improvement "
               f"{(before - after) / before:.1%} | achievement {t / after:.1%} | gap closed {gap:.1%}")
    report = (out / "report.md").read_text()
    speeds = re.search(r"\| generation, batch 1 \(cpu, median of 5\) \| ([\d,]+) tok/s \| ([\d,]+) tok/s \|", report)
    compression = models["teacher"][0].num_params() / models["student"][0].num_params()
    p.line(f"compression {compression:.1f}x | generation {speeds[1]} vs {speeds[2]} tok/s (teacher vs student, cpu)")
    archive = out.parent / "course_results.zip"
    p.line(f"wrote {archive} ({os.path.getsize(archive) / 1e6:.1f} MB)")
    assert not p.unclaimed()
