"""Every flag of a lesson, at a value unlike its default and unlike the others, reaches the object
that uses it; and what the lesson prints about its run is what it saved.

One run of each lesson with all its flags moved at once: a spy on each function the lesson hands a
flag to records what it was given. A flag swapped with another, or left at its default, shows up
here, where a run at the defaults (where several flags share a value) cannot tell.
"""
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from conftest import hf_model, load_lesson, run_here  # noqa: E402


def spy(monkeypatch, module, name, calls):
    """module.name still runs, each call's arguments appended to calls."""
    real = getattr(module, name)

    def recorded(*a, **k):
        calls.append((a, k))
        return real(*a, **k)
    monkeypatch.setattr(module, name, recorded)


def test_02s_flags_reach_the_sampler_the_caches_the_filter_and_the_split(start_copy, monkeypatch):
    """02 at --temperature 0.7 --top-k 7 --top-p 0.8 --batch-size 5 --max-new-tokens 20 --seed 11
    --topk-logits 5 --cache-draws 3 --prompts topics --max-repeat 0.05: each reaches generate, the
    step by hand, the caches, keep_good; and the lines it prints count what it saved."""
    import torch

    import common.sampling
    from common import toy_language
    from common.plumbing.artifacts import load_artifact
    from common.tokenizer import EOT, get_tokenizer
    L02 = load_lesson("02_generate.py")
    gen, step, cache = [], [], []
    spy(monkeypatch, common.sampling, "generate", gen)
    spy(monkeypatch, common.sampling, "sample_next", step)
    spy(monkeypatch, common.sampling, "sampled_cache", cache)
    n = 24
    r = run_here(["02_generate.py", "--preset", "tiny", "--out", str(start_copy), "--num-samples", str(n),
                  "--max-new-tokens", "20", "--temperature", "0.7", "--top-k", "7", "--top-p", "0.8",
                  "--batch-size", "5", "--seed", "11", "--topk-logits", "5", "--cache-draws", "3",
                  "--prompts", "topics", "--max-repeat", "0.05"])
    assert r.returncode == 0, r.stdout + r.stderr
    # the sampler: every batch at the flags' settings, 5 rows at most, 20 new tokens, the seed's stream
    assert [len(a[1]) for a, k in gen] == [5, 5, 5, 5, 4]
    for a, k in gen:
        assert a[2] == 20 and (k["temperature"], k["top_k"], k["top_p"]) == (0.7, 7, 0.8)
        assert k["generator"].initial_seed() == 11
    a, k = step[0]  # the step by hand's twin, before any generate
    assert a[1:4] == (0.7, 7, 0.8) and a[4].initial_seed() == 11
    # the caches: the top 5, and 3 draws a position from a stream of its own
    data = load_artifact(str(start_copy / "generated.pt"), "generated")
    assert {a[1] for a, k in cache} == {3} and {a[2].initial_seed() for a, k in cache} == {12}
    for split in ("train", "val", "test"):
        for seq, ids, counts in zip(data[split], data[f"{split}_topk_ids"], data[f"{split}_sampled_counts"]):
            assert ids.shape == (len(seq) - 1, 5) and (counts.sum(-1) == 3).all()
    # the openings: the first n topics, each sample starting from its own, none unconditional
    enc = get_tokenizer()
    opened = set()
    for split in ("train", "val", "test"):
        for seq, P in zip(data[split], data[f"{split}_prompt_lens"]):
            assert P > 1 and seq[0] == EOT
            opened.add(enc.decode(seq[1:P].tolist()))
    assert opened <= set(toy_language.OPENINGS[:n])
    # the filter: nothing kept repeats more than 0.05 of its 4-grams (a sample of 20 tokens that
    # repeats one 4-gram is over it; at the default 0.5 such samples stay)
    kept = [(s, p) for split in ("train", "val", "test") for s, p in zip(data[split], data[f"{split}_prompt_lens"])]
    for s, p in kept:
        new = s[p:].tolist()
        assert L02.repeated_ngram_fraction(new[:-1] if new[-1] == EOT else new) <= 0.05
    # what it printed: kept and dropped add up to what was written; each split's samples and openings
    out = r.stdout
    k, total = map(int, re.search(r"kept (\d+) of (\d+)", out).groups())
    assert (k, total) == (len(kept), n) and sum(data["dropped"].values()) == n - k
    assert re.search(r"(\d+) repetitive", out).group(1) == str(data["dropped"]["repetitive"])
    for split in ("train", "val", "test"):
        want = f"{split} {len(data[split])} samples ({len(data[f'{split}_openings'])} openings)"
        assert want in out
    n_tok, n_new = sum(len(s) for s, _ in kept), sum(len(s) - p for s, p in kept)
    assert f"{n_tok:,} tokens, {n_new:,} of them sampled (mean {n_tok / k:.0f} per sample)" in out
    distinct = torch.cat([(c > 0).sum(-1) for split in ("train", "val", "test")
                          for c in data[f"{split}_sampled_counts"]]).float().mean()
    assert "top-5: 30 bytes" in out and f"3 draws: {distinct:.1f} distinct ids, {distinct * 5:.0f} bytes" in out
    assert data["settings"]["max_repeat"] == 0.05 and data["settings"]["seed"] == 11
    # the soft targets' table: its last row, the mass of every other token at T = 1 and at T = 2
    st = data["soft_targets"]
    said = re.search(rf"  the other {enc.n_vocab - len(st['ids']):,} +([\d.]+) +([\d.]+)\n", out)
    assert [float(v) for v in said.groups()] == pytest.approx([1 - sum(st["p_T1"]), 1 - sum(st["p_T"])], abs=0.0015)


def test_05s_flags_reach_every_measurement_and_its_printed_lines_are_eval_pt(course_copy, monkeypatch, tmp_path):
    """05 with --eval-text, --max-tokens 40, --stride 9, --batch-size 3: the text is cut to 40 tokens and
    scored at that stride, every measurement runs 3 at a time; each printed perplexity and the sets line
    are what eval.pt and generated.pt hold, and the stream's perplexity is common/perplexity's."""
    import math

    import torch

    import common.perplexity
    from common.plumbing.artifacts import load_artifact, load_model
    from common.tokenizer import get_tokenizer
    from test_train import keep_train_samples
    keep_train_samples(course_copy, None, n_test=4)  # 4 test samples are enough to follow the flags
    seqs, streams, scored = [], [], []
    spy(monkeypatch, common.perplexity, "sequences_nll", seqs)
    spy(monkeypatch, common.perplexity, "stream_nll", streams)
    spy(monkeypatch, common.perplexity, "score_sampled", scored)
    text = tmp_path / "story.txt"
    text.write_text("Tom was a happy farmer. He went to the park with his dog. " * 8)
    r = run_here(["05_evaluate.py", "--preset", "tiny", "--out", str(course_copy), "--eval-text", str(text),
                  "--max-tokens", "40", "--stride", "9", "--batch-size", "3"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(seqs) >= 6 and all(k.get("batch_size") == 3 for a, k in seqs[1:])  # [0]: sample 0 by hand
    assert len(streams) == 3 and all(k["batch_size"] == 3 and k["stride"] == 9 and len(a[1]) == 40
                                     for a, k in streams)
    assert len(scored) == 3 and all(a[4] == 3 for a, k in scored)
    ev = load_artifact(str(course_copy / "eval.pt"), "eval")
    assert ev["stride"] == 9 and set(ev["perplexity"]) == {"generated-test", "toy-language", "story.txt"}
    tokens = torch.tensor(get_tokenizer().encode(text.read_text()))[:40]
    for name in ("teacher", "student_init", "student"):
        model, _ = load_model(str(course_copy / f"{name}.pt"), ("student_init", "student", "teacher"))
        nll, n = common.perplexity.stream_nll(model, tokens, stride=9)
        assert ev["perplexity"]["story.txt"][name] == pytest.approx(math.exp(nll / n), rel=1e-4)
    for set_name, row in ev["perplexity"].items():
        for name, value in row.items():
            assert re.search(rf"{re.escape(set_name)}\s+{name}\s+ppl\s+{value:,.2f}\b", r.stdout), (set_name, name)
    data = load_artifact(str(course_copy / "generated.pt"), "generated")
    sampled = sum(len(s) - P for s, P in zip(data["test"], data["test_prompt_lens"]))
    assert (f"sets: generated-test ({len(data['test'])} samples, {sampled:,} sampled tokens), toy-language "
            f"(60 documents), story.txt (40 tokens) | window {ev['window']}, stride 9") in r.stdout


def test_06s_flags_reach_the_side_by_side_and_every_number_of_its_report_is_its_source(course_copy, monkeypatch):
    """06 at --max-new-tokens 9 --seed 5: the side-by-side texts are 9 tokens from that seed (written
    again here); every line of report.md and of the summary that carries a number is recomputed from
    eval.pt, train_log.pt, generated.pt and the models: rates, the training line, the teacher's val
    cross-entropy, the models' table, the agreement table, the soft targets' students."""
    import math

    import torch

    import common.sampling
    from common.perplexity import sequences_nll
    from common.plumbing.artifacts import load_artifact, load_model
    from common.tokenizer import EOT, get_tokenizer
    L06 = load_lesson("06_compare.py")
    calls = []
    spy(monkeypatch, common.sampling, "generate", calls)
    r = run_here(["06_compare.py", "--preset", "tiny", "--out", str(course_copy), "--max-new-tokens", "9",
                  "--seed", "5"])
    assert r.returncode == 0, r.stdout + r.stderr
    side = [k for a, k in calls if k.get("eos_token") == EOT]
    assert len(side) == 2 * len(L06.PROMPTS) and all(k["generator"].initial_seed() == 5 for k in side)
    assert [a[2] for a, k in calls if k.get("eos_token") == EOT] == [9] * len(side)
    report = (course_copy / "report.md").read_text()
    ev = load_artifact(str(course_copy / "eval.pt"), "eval")
    log = load_artifact(str(course_copy / "train_log.pt"), "train_log")
    data = load_artifact(str(course_copy / "generated.pt"), "generated")
    enc = get_tokenizer()
    models = {n: load_model(str(course_copy / f"{n}.pt"), ("student_init", "student", "teacher"))[0]
              for n in ("teacher", "student_init", "student")}
    # the side by side, written again: same prompt, same seed, 9 tokens
    assert "same seed (5)" in report
    for prompt in L06.PROMPTS:
        idx = torch.tensor([[EOT] + enc.encode(prompt)])
        for name in ("teacher", "student"):
            g = torch.Generator().manual_seed(5)
            ids = common.sampling.generate(models[name], idx, 9, temperature=0.9, top_k=50, top_p=0.95,
                                           eos_token=EOT, generator=g)[0, idx.size(1):].tolist()
            text = enc.decode([i for i in ids if i != EOT]).strip()
            assert f"- {name}: {prompt} {text}\n" in report
    # the perplexity table and the summary: improvement, achievement, gap closed from eval.pt
    for set_name, p in ev["perplexity"].items():
        imp = (p["student_init"] - p["student"]) / p["student_init"]
        ach = p["teacher"] / p["student"]
        gap = (math.log(p["student_init"]) - math.log(p["student"])) / (math.log(p["student_init"])
                                                                         - math.log(p["teacher"]))
        assert (f"| {set_name} | {p['teacher']:,.2f} | {p['student_init']:,.2f} | {p['student']:,.2f} | "
                f"{imp:.1%} | {ach:.1%} | {gap:.1%} |") in report
        assert (f"{set_name:<16} ppl teacher {p['teacher']:,.2f} | student {p['student_init']:,.2f} -> "
                f"{p['student']:,.2f} | improvement {imp:.1%} | achievement {ach:.1%} | gap closed "
                f"{gap:.1%}") in r.stdout
    st = log["settings"]
    assert (f"Student trained with {st['kd']} KD, {st['epochs']} epochs, {log['tokens']:,} sampled tokens "
            f"seen, {log['wall_time']:.0f}s of training") in report
    assert f"process(es), {log['dtype']}. Perplexity window {ev['window']}, stride {ev['stride']}." in report
    assert ev["skipped"] and all(f"Not evaluated: {k} ({why}).\n" in report for k, why in ev["skipped"].items())
    # the teacher's level on 04's val samples, and the student's best val loss
    nll, n = sequences_nll(models["teacher"], data["val"], prompt_lens=data["val_prompt_lens"])
    assert f"{nll / n:.4f} nats per token" in report and f"the student's best: {log['best_val']:.4f}." in report
    # the two models, side by side in numbers
    t, s = models["teacher"], models["student"]
    for label, a, b in (("parameters", f"{t.num_params() / 1e6:.1f}M", f"{s.num_params() / 1e6:.1f}M"),
                        ("without embeddings", f"{t.num_params(False) / 1e6:.2f}M",
                         f"{s.num_params(False) / 1e6:.2f}M"),
                        ("layers / width / heads", *(f"{m.config.n_layer} / {m.config.n_embd} / {m.config.n_head}"
                                                     for m in (t, s))),
                        ("checkpoint on disk (fp32)", *(f"{os.path.getsize(course_copy / f) / 1e6:.1f} MB"
                                                        for f in ("teacher.pt", "student.pt")))):
        assert f"| {label} | {a} | {b} |" in report
    compression = t.num_params() / s.num_params()
    assert f"| compression | | {compression:.1f}x fewer parameters |" in report
    assert f"compression {compression:.1f}x" in r.stdout
    # agreement and KL, as 05 saved them
    for name, label in L06.LABELS.items():
        assert f"| {label} | {ev['agreement'][name]:.1%} | {ev['kl'][name]:.4f} |" in report
    # the soft targets: each student's probabilities at 02's position
    st = data["soft_targets"]
    with torch.no_grad():
        probs = {n: torch.softmax(models[n](torch.tensor([st["context"]]))[0][0, -1].float(), -1)[st["ids"]]
                 for n in ("student_init", "student")}
    for k, i in enumerate(st["ids"]):
        assert (f"| {enc.decode([i])!r} | {st['p_T1'][k]:.3f} | {st['p_T'][k]:.3f} | "
                f"{float(probs['student_init'][k]):.5f} | {float(probs['student'][k]):.3f} |") in report


def test_08s_flags_reach_every_run_and_its_report_is_its_rows(course_copy, monkeypatch):
    """08 at --prompts 3 --new-tokens 10 --draft-tokens 2 --repeats 2: every speculative run covers 3
    prompts of 10 new tokens with g = 2, each timed twice; the printed lines and speculative.md are the
    rows of speculative.pt, and each speedup is the median of its turns."""
    import torch

    import common.speculative
    from common.plumbing.artifacts import load_artifact
    from test_train import keep_train_samples
    L08 = load_lesson("08_speculative.py")
    keep_train_samples(course_copy, None, n_test=4)  # the held-out overlap on 4 samples: 3 prompts of them
    calls, results = [], []
    real = common.speculative.speculative_generate
    monkeypatch.setattr(common.speculative, "speculative_generate",
                        lambda *a, **k: calls.append((a, k)) or results.append(real(*a, **k)) or results[-1])
    r = run_here(["08_speculative.py", "--preset", "tiny", "--out", str(course_copy), "--prompts", "3",
                  "--new-tokens", "10", "--draft-tokens", "2", "--repeats", "2"])
    assert r.returncode == 0, r.stdout + r.stderr
    res = load_artifact(str(course_copy / "speculative.pt"), "speculative")
    rows = res["rows"]
    drafts, settings = {x["draft"] for x in rows}, {x["setting"] for x in rows}
    assert {x["g"] for x in rows} == {2} and len(rows) == len(drafts) * len(settings) == 4
    # each run: 3 prompts; each timed 2 times: 3 x 2 calls a row, each for 10 tokens with g = 2
    assert len(calls) == 3 * 2 * len(rows)
    data = load_artifact(str(course_copy / "generated.pt"), "generated")
    prompts = [s[:P] for s, P in zip(data["test"], data["test_prompt_lens"])][:3]
    for i, (a, k) in enumerate(calls):
        assert a[3:5] == (10, 2) and torch.equal(a[2], prompts[i % 3])
    assert all(len(t) == 2 for t in res["steps"].values())
    md = (course_copy / "speculative.md").read_text()
    assert "3 prompts of the teacher's held-out test samples, 10 new tokens each" in md
    assert "Every timing is the median of 2" in md
    # each run's counts, summed over its 3 prompts: proposals (trials), tokens, tokens per teacher call
    runs = {(sum(len(st["trials"]) for _, st in group), sum(len(new) for new, _ in group),
             sum(st["target_calls"] for _, st in group)) for group in zip(*[iter(results)] * 3)}
    for x in rows:
        assert x["speedup_lo"] <= x["speedup"] <= x["speedup_hi"]
        calls_made = x["tokens"] / x["tokens_per_call"]
        assert (x["proposals"], x["tokens"], round(calls_made)) in runs
        assert L08.line(x) in r.stdout
        assert (f"| {x['setting']} | {x['draft']} | {x['held_out']:.3f} | {x['g']} | {x['acceptance']:.3f} | "
                f"{x['expected']:.3f} ± {x['diff_2se']:.3f} | {x['tokens_per_call']:.2f} | "
                f"{x['closed_form']:.2f} | {x['c']:.2f} | {L08.speedup_text(x)} | {x['predicted']:.2f}x |") in md
        assert x["held_out"] == res["overlap"][x["draft"]][x["setting"]]
    best = max(rows, key=lambda x: x["speedup"])
    assert f"the best row is {best['draft']} at g={best['g']} ({best['setting']})" in md
    ratios = sorted(x["speedup"] / x["predicted"] for x in rows)  # 4 rows: the median is the upper middle
    assert f"Measured speedups are a median {ratios[2]:.0%} of the predicted ones" in md
    for name, t in res["steps"].items():
        assert res["step"][name] == t[1] and t == sorted(t)  # the median of 2 sorted: the upper
    # the run's description and the cost of one step: each model's median and range, as saved
    from common.plumbing.artifacts import load_model
    source = load_model(str(course_copy / "teacher.pt"), "teacher")[1]["source"]
    assert (f"teacher: {source} | drafts: student_init, student | 3 test prompts x 10 new tokens | g in [2] | "
            f"cpu\n") in r.stdout
    assert ("one decoding step (plain sampling, batch 1, median of 2): " + ", ".join(
        f"{n} {1e3 * res['step'][n]:.2f} ms ({1e3 * t[0]:.2f}-{1e3 * t[-1]:.2f})" for n, t in res["steps"].items())
        + "\n") in r.stdout


def test_09_hands_its_flags_to_03_and_04_and_reports_what_it_measured(monkeypatch):
    """run_start: the seed to both, --n-layer and the start's flags to 03, --epochs and --lr to 04, a
    folder per start, seed and rate; report(): each cell the mean (min–max) of its seeds, the steps
    and the seeds it names."""
    import argparse
    L09 = load_lesson("09_starts.py")
    got = {}

    def train(label, sub, flags, out, start, fresh, inputs, make=None):
        got.update(label=label, sub=sub, flags=flags, make=make, fresh=fresh)
        return {"step": [7]}
    monkeypatch.setattr(L09, "train", train)
    args = argparse.Namespace(preset="tiny", out="o", n_layer=1, epochs=2, lr=3e-3, fresh=True)
    sub, log = L09.run_start(args, "every other block", 1338)
    assert sub == got["sub"] == "o/starts/every_other_block/seed1338-lr0.003" and got["fresh"]
    assert got["make"] == ["--preset", "tiny", "--out", sub, "--seed", "1338", "--n-layer", "1",
                           *L09.STARTS["every other block"]]
    assert got["flags"] == ["--preset", "tiny", "--out", sub, "--seed", "1338", "--epochs", "2", "--lr", "0.003"]
    args.lr, args.epochs = None, None
    L09.run_start(args, "random", 1337)
    assert got["sub"] == "o/starts/random/seed1337" and got["flags"][-2:] == ["--seed", "1337"]
    runs = [{"ppl": 10.0, "acceptance": 0.5, "toy_ppl": 20.0, "params": 1e6},
            {"ppl": 14.0, "acceptance": 0.7, "toy_ppl": 30.0, "params": 1e6}]
    s = L09.summary(runs)
    assert s["ppl"] == (12.0, 10.0, 14.0) and s["acceptance"] == pytest.approx((0.6, 0.5, 0.7))
    rows = {"random": {"before": s, "after": L09.summary(runs[:1] * 2)}}
    teacher = {"ppl": 3.0, "acceptance": 1.0, "toy_ppl": 4.0, "params": 3.3e6}
    md = "\n".join(L09.report(rows, teacher, 5.5, argparse.Namespace(preset="tiny", lr=3e-3, seeds=2), 9, 6))
    assert "--lr 0.003` with the same recipe (9 optimizer steps), seeds 1337–1338" in md
    assert "teacher's 6 held-out test samples" in md and "perplexity, 5.50)" in md
    assert "| teacher | 3.30M | 3.00 | | 4.00 | | 1 | |" in md
    assert ("| random | 1.00M | 12.00 (10.00–14.00) | 10.00 (10.00–10.00) | 25.00 (20.00–30.00) | "
            "20.00 (20.00–20.00) | 0.600 (0.500–0.700) | 0.500 (0.500–0.500) |") in md


def test_10_trains_each_student_with_its_own_epochs_rate_batch_and_schedule(start_copy, monkeypatch):
    """train(): --byte-epochs for a byte student, --epochs for the token one, each step at lr_at of its
    step with --lr, 04's tenth for warmup and floor, batches of --batch-size (the last one the rest)."""
    import argparse

    from common.plumbing.artifacts import load_artifact
    from common.plumbing.device import precision
    from common.tokenizer import get_tokenizer
    L10 = load_lesson("10_bytes.py")
    gen = load_artifact(str(start_copy / "generated.pt"), "generated")
    sv = L10.SortedVocab(L10.token_bytes(get_tokenizer()))
    texts = [L10.prepare(gen["train"][i].tolist(), gen["train_prompt_lens"][i], sv) for i in range(7)]
    lrs, sizes, opt_lr = [], [], []
    real_lr_at = L10.lr_at
    monkeypatch.setattr(L10, "lr_at", lambda *a: lrs.append(a) or real_lr_at(*a))
    for name in ("byte_loss", "token_loss"):
        real = getattr(L10, name)
        monkeypatch.setattr(L10, name, lambda m, batch, *a, real=real: sizes.append(len(batch)) or real(m, batch, *a))
    args = argparse.Namespace(epochs=3, byte_epochs=2, lr=0.02, batch_size=2)
    for method, steps_want in (("seq", 2 * 4), ("tokens", 3 * 4)):  # 7 texts: 4 batches an epoch
        lrs.clear(), sizes.clear()
        vocab = 257 if method == "seq" else get_tokenizer().n_vocab
        block = max(len(t.bytes) for t in texts) if method == "seq" else 256
        model = L10.GPT(L10.GPTConfig(block_size=block, vocab_size=vocab, **L10.STUDENT["tiny"]))
        real_opt = model.configure_optimizer
        model.configure_optimizer = lambda lr, *a: opt_lr.append(lr) or real_opt(lr, *a)
        _, steps = L10.train(model, texts, method, args, precision("cpu"), 1337)
        assert steps == steps_want and sizes == [2, 2, 2, 1] * (steps // 4)
        # a tenth of the steps warm up, at least one: 1 of 8 and of 12 (asked once for each of the
        # optimizer's parameter groups, the same each time)
        assert list(dict.fromkeys(lrs)) == [(i, steps, 1, 0.02, 0.02 * 0.1) for i in range(steps)]
    assert opt_lr == [0.02, 0.02] and L10.MIN_LR_RATIO == 0.1


def test_07s_report_says_each_number_where_it_belongs():
    """report_lines on rows made by hand: the setup line (the warm epochs, steps, epochs, preset, the
    grid, each seed, the test samples, the own-text budget of the first method), a cell per column with
    the seeds' range for methods only, the FLOPs and time, each method's grid and chosen rate, the
    compute."""
    from common.plumbing import lab_report

    def row(base, **more):
        stats = {k: base + i for i, k in enumerate(["ppl", "fkl", "rkl", "acceptance", "teacher_ppl_own",
                                                     "distinct_2"])}
        stats.update(more)
        return {"mean": stats, "min": {k: v - 0.5 for k, v in stats.items()},
                "max": {k: v + 0.25 for k, v in stats.items()}, "runs": [{"own_tokens": 1234}]}
    rows = {"teacher": row(1.0), "start": row(2.0),
            "fkl": {**row(3.0, student_flops=1.5e12, teacher_flops=2.5e11, time=42.4), "lr": 0.003,
                    "grid": {0.001: 1.25, 0.003: 1.125}},
            "rkl": {**row(4.0, student_flops=1.5e12, teacher_flops=2.5e11, time=40.0), "lr": 0.003,
                    "grid": {0.001: float("nan"), 0.003: 0.75}}}  # diverged at 0.001: 0.003 chosen
    rows["fkl"]["runs"] = [{"own_tokens": 1234}, {"own_tokens": 999}]  # the first seed's budget is said
    lab = {"teacher": "T", "warm_epochs": 6, "steps": 52, "epochs": 1, "preset": "tiny", "lr_grid": [0.001, 0.003],
           "seeds": 3, "first_seed": 1337, "n_test": 17, "own_samples": 2}
    compute = {"student_N": 1234567, "teacher_N": 7654321, "start_flops": 3.25e13, "writing": 4.5e12}
    md = "\n".join(lab_report.report_lines(lab, rows, compute))
    assert ("after 6 epochs of sequence-level KD) and trains 52 optimizer steps (1 epochs, 04's defaults for "
            "the tiny preset otherwise)") in md
    assert "from {0.001, 0.003}, with 3 seed(s) (1337, 1338, 1339: data order" in md
    assert "teacher's 17 held-out test samples" in md and "own text: 2 continuations" in md
    assert "1,234 tokens or fewer per model" in md
    assert "| teacher (reference) | | 1.00 | 2.000 | 3.000 | 4.000 | 5.00 | 6.000 |  |  |" in md
    assert "| start (6 epochs of seq) | | 2.00 | 3.000 |" in md
    assert ("| fkl | 0.003 | 3.00 (2.50–3.25) | 4.000 (3.500–4.250) | 5.000 (4.500–5.250) | 6.000 (5.500–6.250) | "
            "7.00 (6.50–7.25) | 8.000 (7.500–8.250) | 1.5e+12 + 2.5e+11 | 42 s |") in md
    assert "| fkl | 1.2500 | 1.1250 | 0.003 |" in md and "| rkl | nan | 0.7500 | 0.003 |" in md
    assert "| method | lr 0.001 | lr 0.003 | chosen |" in md and "seed 1337:" in md
    assert "student N = 1,234,567, teacher N = 7,654,321" in md
    assert "the start, 3.2e+13 FLOPs" in md and "data, 4.5e+12 FLOPs once" in md
    # one seed: each cell is that seed's number, with no range beside it (min = max says nothing)
    md = "\n".join(lab_report.report_lines({**lab, "seeds": 1}, rows, compute))
    assert "| fkl | 0.003 | 3.00 | 4.000 | 5.000 | 6.000 | 7.00 | 8.000 | 1.5e+12 + 2.5e+11 | 42 s |" in md
    assert "–" not in md and "min–max" not in md and "with 1 seed(s) (1337: data order" in md


def test_04_describes_each_kind_with_its_own_flags():
    """describe_run: soft with its T, alpha, tail and top k; jsd with beta; skl with a; eopd with its
    threshold; on-policy with its share and temperature; the schedule, batch, accumulation and rate."""
    import argparse
    import types

    import torch
    L04 = load_lesson("04_train.py")
    from common.model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    data = {"train": [torch.zeros(9), torch.zeros(5)], "train_prompt_lens": [3, 1], "val": [torch.zeros(4)]}
    procs = types.SimpleNamespace(device="cpu", world=2)
    base = dict(kd="seq", kd_temperature=2.0, kd_alpha=0.25, soft_tail="renorm", soft_k=0, jsd_beta=0.3,
                skew=0.2, entropy_threshold=1.5, on_policy=0.0, on_policy_temperature=0.7, epochs=3,
                batch_size=5, grad_accum=4, lr=3e-4)

    def said(**kw):
        setup = types.SimpleNamespace(prec=types.SimpleNamespace(dtype=kw.pop("dtype", "fp32")),
                                      teacher=kw.pop("teacher", None))
        return L04.describe_run(argparse.Namespace(**{**base, **kw}), model, data, procs, setup, (11, 7))
    text = said()
    assert text.startswith(f"student {model.num_params() / 1e6:.1f}M params | 2 train / 1 val samples, 10 "
                           f"sampled tokens to learn from | cpu fp32 | 2 process(es)\n")
    assert text.endswith("kd seq | 3 epochs x 11 steps | batch 5 x accum 4 x 2 | lr 3.0e-04, warmup 7")
    assert "| cpu fp16 + GradScaler |" in said(dtype="fp16")
    assert "kd soft (T=2.0, alpha=0.25, rest bucket, top 5) |" in said(kd="soft", soft_tail="rest", soft_k=5)
    assert "kd soft (T=2.0, alpha=0.25, sampled cache) |" in said(kd="soft", soft_tail="sampled")
    assert "kd jsd (beta=0.3), on-policy 0.5 (T=0.7) with the teacher online |" in said(
        kd="jsd", on_policy=0.5, teacher=object())
    assert "kd skl (a=0.2) |" in said(kd="skl")
    assert "kd eopd (entropy above 1.5 nats) |" in said(kd="eopd")


def test_01s_model_flag_reaches_the_download(monkeypatch, tmp_path):
    """01 --model gpt2-medium asks the hub for gpt2-medium (each size its own name), not the default."""
    import common.plumbing.download as download

    class Asked(Exception):
        pass

    def download_gpt2(name):
        raise Asked(name)
    monkeypatch.setattr(download, "download_gpt2", download_gpt2)
    for name in ("gpt2-medium", "gpt2-xl"):
        with pytest.raises(Asked) as e:
            run_here(["01_teacher.py", "--model", name, "--out", str(tmp_path)])
        assert e.value.args == (name,)


def test_01_records_the_preset_it_was_given_with_or_without_weights(tmp_path):
    """teacher.pt's preset is --preset's, also where --weights brings GPT-2's shape to the tiny preset
    (a learner's own small GPT-2 for the tiny course, docs/your-models.md): the later lessons check
    it against their own --preset."""
    from test_model import save_layout

    from common.plumbing.artifacts import load_model
    folder = save_layout(hf_model(vocab_size=50257), tmp_path / "hub", "hub-safetensors")
    for preset in ("tiny", "gpt2"):
        r = run_here(["01_teacher.py", "--preset", preset, "--weights", folder, "--out", str(tmp_path / preset)])
        assert r.returncode == 0, r.stderr
        ckpt = load_model(str(tmp_path / preset / "teacher.pt"), "teacher", vocab_size=50257)[1]
        assert ckpt["preset"] == preset and ckpt["language"] == "english"


def test_03s_shape_init_and_seed_reach_the_student_it_writes(start_copy):
    """03 --n-layer 1 --n-embd 24 --n-head 3 --init-std 0.05 --seed 7: student_init.pt is the GPT of
    that shape built here after torch.manual_seed(7), weight for weight, and records seed 7; another
    seed, other weights."""
    import torch

    from common.model import GPT, GPTConfig
    from common.plumbing.artifacts import load_model
    teacher = load_model(str(start_copy / "teacher.pt"), "teacher")[0].config
    made = {}
    for seed in (7, 8):
        r = run_here(["03_student.py", "--preset", "tiny", "--out", str(start_copy), "--n-layer", "1", "--n-embd", "24",
                      "--n-head", "3", "--init-std", "0.05", "--seed", str(seed)])
        assert r.returncode == 0, r.stdout + r.stderr
        made[seed], ckpt = load_model(str(start_copy / "student_init.pt"), "student_init")
        assert ckpt["seed"] == seed
    torch.manual_seed(7)
    want = GPT(GPTConfig(block_size=teacher.block_size, vocab_size=teacher.vocab_size, n_layer=1, n_head=3,
                         n_embd=24, init_std=0.05))
    assert made[7].config == want.config
    for name, w in want.state_dict().items():
        assert torch.equal(made[7].state_dict()[name], w), name
    assert not torch.equal(made[7].transformer.h[0].attn.c_attn.weight, made[8].transformer.h[0].attn.c_attn.weight)
