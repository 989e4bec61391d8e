"""Lesson 07, the divergence lab: each measurement against an independent computation on small
random models, then end to end on the tiny course (cut to a few steps)."""
import math
import re

import matplotlib.image
import pytest
import torch
from torch.nn import functional as F

from common.data import make_batch
from common.model import GPT, GPTConfig
from common.perplexity import score_sampled
from common.plumbing import lab_report as REPORT
from common.plumbing.artifacts import load_artifact, load_model
from common.plumbing.device import Precision
from conftest import load_lesson, run_here
from test_train import keep_train_samples

LAB = load_lesson("07_methods.py")
PRICE = load_lesson("bench/price_of_top_k.py")
V = 50257  # the models must read GPT-2's tokens: 07 ends texts at <|endoftext|> (50256)


def model(seed, n_embd=16):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=1, n_head=2, n_embd=n_embd)).eval()
    with torch.no_grad():
        m.transformer.ln_f.weight.mul_(40)  # sharper distributions than at initialisation
    return m


def samples(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 1000, (int(torch.randint(6, 12, (1,), generator=g)),), generator=g)
            for _ in range(n)]
    return seqs, [2, 3, 1, 4, 2][:n]


def test_held_out_scores_are_the_nll_the_two_kls_and_the_acceptance():
    """Against float64 formulas written here, position by position: per-sample sums of the NLL of
    the teacher's token, KL(p||q), KL(q||p) (in that order: swapped columns fail) and sum min(p, q)."""
    student, teacher = model(0), model(1)
    seqs, P = samples()
    sums, counts = score_sampled([student, teacher], seqs, P, LAB.held_out_scores, 2)
    x, y = make_batch(seqs, prompt_lens=P)
    with torch.no_grad():
        log_q = torch.log_softmax(student(x)[0].double(), -1)
        log_p = torch.log_softmax(teacher(x)[0].double(), -1)
    scored = y != -100
    nll = -log_q.gather(-1, y.clamp(min=0)[..., None])[..., 0]
    fkl = (log_p.exp() * (log_p - log_q)).sum(-1)
    rkl = (log_q.exp() * (log_q - log_p)).sum(-1)
    acc = torch.minimum(log_p.exp(), log_q.exp()).sum(-1)
    want = torch.stack([(v * scored).sum(-1) for v in (nll, fkl, rkl, acc)])
    assert torch.equal(counts, scored.sum(-1))
    assert torch.allclose(sums, want, rtol=1e-4)
    assert (want[1] - want[2]).abs().max() > 0.05 and (acc[scored] < 0.99).all()


def test_price_of_top_k_at_k_equal_to_the_vocabulary_is_the_exact_kl():
    """With every token kept, the renormalised KL (at T = 1: a T = 2 one fails) and the rest-bucket
    KL are the exact KL; the token groups add up to it, the top group brute-forced here."""
    student, teacher = model(2), model(3)
    seqs, P = samples(1, 3)
    used = torch.zeros(V, dtype=torch.bool)
    used[:500] = True
    price = PRICE.price_of_top_k(student, teacher, seqs, P, used, 2, ks=(8, V), group_k=8)
    assert price["renorm"][V] == pytest.approx(price["exact"], rel=1e-4)
    assert price["rest"][V] == pytest.approx(price["exact"], rel=1e-4)
    assert price["rest"][8] <= price["exact"] + 1e-6
    g = price["groups"]
    assert g["top"] + g["used_rest"] + g["never"] == pytest.approx(price["exact"], rel=1e-9)
    x, y = make_batch(seqs, prompt_lens=P)
    with torch.no_grad():
        log_q = torch.log_softmax(student(x)[0].double(), -1)[y != -100]
        log_p = torch.log_softmax(teacher(x)[0].double(), -1)[y != -100]
    top = log_p.topk(8, -1).indices
    want_top = (log_p.exp().gather(-1, top) * (log_p.gather(-1, top) - log_q.gather(-1, top))).sum(-1)
    assert g["top"] == pytest.approx(want_top.mean().item(), rel=1e-4)
    never = ~used & ~torch.zeros_like(log_p, dtype=torch.bool).scatter(-1, top, True)  # (the top ones apart)
    never_p = (log_p.exp() * never).sum(-1).mean().item()
    assert g["p_never"] == pytest.approx(never_p, rel=1e-4) and never_p > 0.1


def test_mean_and_spread_by_hand():
    """Per-sample sums (3, 5, 10) over counts (1, 2, 4): mean 18/7; residuals s - mean * n; with
    k = 3 samples the ratio estimator's standard error is sqrt(sum r^2 * k / (k - 1)) / sum n."""
    sums, counts = torch.tensor([3.0, 5.0, 10.0]).double(), torch.tensor([1, 2, 4])
    mean, two_se = LAB.mean_and_spread(sums, counts)
    m = 18 / 7
    r = [3 - m * 1, 5 - m * 2, 10 - m * 4]
    assert mean == pytest.approx(m)
    assert two_se == pytest.approx(2 * math.sqrt(sum(v * v for v in r) * 3 / 2) / 7)


def test_own_text_is_drawn_at_temperature_1_untruncated(monkeypatch):
    """Each model writes its own text from its real distribution: temperature 1, no top-k or top-p
    (at T = 0.7 the teacher would grade a sharpened student), with the same seeded generator."""
    calls = []
    real = LAB.continue_each
    monkeypatch.setattr(LAB, "continue_each", lambda *a, **k: calls.append(k) or real(*a, **k))
    m = model(4, n_embd=8)
    seqs, P = samples(5, 3)
    first, _ = LAB.own_text(m, seqs, P, "cpu", 2)
    again, _ = LAB.own_text(m, seqs, P, "cpu", 2)
    assert calls and all(k.get("temperature") == 1.0 and k.get("top_k") is None and k.get("top_p") is None
                         for k in calls)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_own_text_continues_each_prompt_from_its_own_length_per_prompt_times():
    """own_text with per_prompt 2 on prompts of lengths 2, 3, 1: texts 2k and 2k + 1 both continue
    prompt k, from its own length (returned beside them), for as many tokens as its sample has."""
    m = model(4, n_embd=8)
    seqs, P = samples(5, 3)
    texts, PP = LAB.own_text(m, seqs, P, "cpu", 2)
    assert PP == [2, 2, 3, 3, 1, 1] and len(texts) == 6
    for k, t in enumerate(texts):
        s, p = seqs[k // 2], P[k // 2]
        assert torch.equal(t[:p], s[:p]) and (len(t) == len(s) or (len(t) < len(s) and t[-1] == 50256))
    assert not torch.equal(texts[0], texts[1])  # two draws, not one twice


def test_the_teacher_grades_the_students_own_text(monkeypatch):
    """measure's own-text column: the teacher's perplexity on the text the student wrote (the
    student grading itself fails), computed here from a plain forward pass."""
    student, teacher = model(5), model(6)
    seqs, P = samples(2, 4)
    args = type("Args", (), {"batch_size": 2, "own_samples": 2})()
    row = LAB.measure(student, teacher, (seqs, P), args, Precision("cpu", "fp32"))
    texts, PP = LAB.own_text(student, seqs, P, "cpu", 2)
    per_text, lens, pairs = [], [], []
    for t, p in zip(texts, PP):
        with torch.no_grad():
            lp = torch.log_softmax(teacher(t[None, :-1])[0][0].double(), -1)
        per_text.append(-lp[torch.arange(p - 1, len(t) - 1), t[p:]].sum().item())
        lens.append(len(t) - p)
        pairs += [(int(t[j]), int(t[j + 1])) for j in range(p, len(t) - 1)]
    nll, n, k = sum(per_text), sum(lens), len(texts)
    assert row["teacher_ppl_own"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert row["own_tokens"] == n
    # its spread: two standard errors of that mean, the texts as the units (the ratio estimator)
    se = math.sqrt(sum((s - nll / n * m) ** 2 for s, m in zip(per_text, lens)) * k / (k - 1)) / n
    assert row["own_spread"] == pytest.approx(math.exp(2 * se) - 1, rel=1e-4)
    assert row["distinct_2"] == len(set(pairs)) / len(pairs)


def test_each_methods_val_objective_is_its_own_loss():
    """seq: cross-entropy on the teacher's val text; fkl: the forward KL there; rkl+on-policy 1 and
    rkl-sampled and rkl-vopd: the exact reverse KL on the student's own continuations; soft (rest
    bucket): the K + 1 bucket KL mixed with cross-entropy, top-5 + rest the same on the first 5 kept;
    sampled: the KL to the sampled cache's frequencies; skl: the skew KL. Each computed here in
    float64."""
    student, teacher = model(7), model(8)
    seqs, P = samples(3, 4)
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, V, (len(s) - 1, 8), generator=g) for s in seqs]
    data = {"val": seqs, "val_prompt_lens": P, "val_topk_ids": ids,
            "val_sampled_ids": [torch.randint(0, V, (len(s) - 1, 3), generator=g) for s in seqs],
            "val_sampled_counts": [torch.randint(0, 5, (len(s) - 1, 3), generator=g).to(torch.uint8) for s in seqs]}
    with torch.no_grad():
        data["val_topk_logprobs"] = [torch.log_softmax(teacher(s[None, :-1])[0][0], -1).gather(-1, i).half()
                                     for s, i in zip(seqs, ids)]
    args = type("Args", (), {"batch_size": 3})()

    def logprobs(text):
        x, y = make_batch(text, prompt_lens=P)
        with torch.no_grad():
            return (torch.log_softmax(student(x)[0].double(), -1), torch.log_softmax(teacher(x)[0].double(), -1),
                    y, y != -100)

    log_q, log_p, y, scored = logprobs(seqs)
    ce = -log_q.gather(-1, y.clamp(min=0)[..., None])[..., 0]
    fkl = (log_p.exp() * (log_p - log_q)).sum(-1)
    objective = lambda name: LAB.val_objective(LAB.METHODS[name], student, teacher, data, args, Precision("cpu", "fp32"))  # noqa: E731
    assert objective("seq") == pytest.approx(ce[scored].mean().item(), rel=1e-4)
    assert objective("fkl") == pytest.approx(fkl[scored].mean().item(), rel=1e-4)
    own, _ = LAB.own_text(student, seqs, P, "cpu", 1, seed=LAB.SAMPLE_SEED + 1)
    log_q, log_p, _, scored = logprobs(own)
    rkl = (log_q.exp() * (log_q - log_p)).sum(-1)[scored].mean().item()
    assert objective("rkl+on-policy 1") == pytest.approx(rkl, rel=1e-4)
    assert objective("rkl-sampled+on-policy 1") == pytest.approx(rkl, rel=1e-4)
    _, _, ids_b, lps_b = make_batch(seqs, data["val_topk_ids"], data["val_topk_logprobs"])
    log_q, _, y, scored = logprobs(seqs)
    p_k = lps_b.double().exp()
    q_k = log_q.exp().gather(-1, ids_b.long())
    Pb = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    Qb = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    kl = (Pb * (Pb.log() - Qb.log())).sum(-1)
    want = 0.5 * kl[scored].mean().item() + 0.5 * ce[scored].mean().item()
    assert objective("soft (rest bucket)") == pytest.approx(want, rel=1e-4)
    # the same on the first 5 of the 8 stored (--soft-k 5), and the sampled cache's KL to counts / their sum
    Pb = torch.cat([p_k[..., :5], 1 - p_k[..., :5].sum(-1, keepdim=True)], -1)
    Qb = torch.cat([q_k[..., :5], 1 - q_k[..., :5].sum(-1, keepdim=True)], -1)
    kl = (Pb * (Pb.log() - Qb.log())).sum(-1)
    assert objective("top-5 + rest") == pytest.approx(0.5 * kl[scored].mean().item() + 0.5 * ce[scored].mean().item(), rel=1e-4)
    _, _, ids_s, counts = make_batch(seqs, data["val_sampled_ids"], data["val_sampled_counts"])
    t = counts.double() / counts.double().sum(-1, keepdim=True)
    kl = torch.where(t > 0, t * (t.log() - log_q.gather(-1, ids_s.long())), 0.0).sum(-1)
    kl = torch.where(counts.sum(-1) > 0, kl, 0.0)  # a position with no draws (counts drawn 0 here) adds 0
    assert objective("sampled") == pytest.approx(0.5 * kl[scored].mean().item() + 0.5 * ce[scored].mean().item(), rel=1e-4)
    log_q, log_p, _, scored = logprobs(seqs)
    skl = (log_p.exp() * (log_p - (0.1 * log_p.exp() + 0.9 * log_q.exp()).log())).sum(-1)
    assert objective("skl") == pytest.approx(skl[scored].mean().item(), rel=1e-4)
    assert objective("rkl-vopd+on-policy 1") == pytest.approx(rkl, rel=1e-4)


def test_the_chosen_rate_is_the_lowest_finite_objective_and_a_diverged_rate_only_if_all_did():
    nan, inf = float("nan"), float("inf")
    assert LAB.best_rate({1e-3: 2.5, 3e-3: 2.1, 1e-2: 2.3}) == 3e-3
    assert LAB.best_rate({1e-3: 2.5, 3e-3: nan, 1e-2: inf}) == 1e-3  # nan and inf sort nowhere useful
    assert LAB.best_rate({3e-3: nan, 1e-3: 2.5}) == 1e-3
    assert LAB.best_rate({1e-3: inf, 1e-2: nan}) in (1e-3, 1e-2)  # every rate diverged: still a rate, no error


def test_verdicts_claim_only_what_the_seeds_separate():
    def row(lo, mean, hi):
        keys = {k for k, _, _ in REPORT.COLUMNS.values()}
        return {"mean": dict.fromkeys(keys, mean), "min": dict.fromkeys(keys, lo), "max": dict.fromkeys(keys, hi)}
    rows = {"seq": row(3.0, 3.1, 3.2), "fkl": row(3.3, 3.4, 3.5), "rkl": row(3.15, 3.5, 3.9)}
    lines = REPORT.verdicts(rows, 3)
    ppl = next(ln for ln in lines if "ppl on teacher text" in ln)
    assert "seq 3.10 (3.00–3.20), then fkl" in ppl and "within the seeds' spread of rkl;" in ppl
    rows["rkl"] = row(3.25, 3.5, 3.9)
    ppl = next(ln for ln in REPORT.verdicts(rows, 3) if "ppl on teacher text" in ln)
    assert ppl.endswith("apart from every other method over every seed.")
    # the runner-up within the best's range, the third apart from it: the runner-up is named
    rows = {"seq": row(3.0, 3.1, 3.2), "fkl": row(3.1, 3.3, 3.6), "rkl": row(3.3, 3.4, 3.5)}
    ppl = next(ln for ln in REPORT.verdicts(rows, 3) if "ppl on teacher text" in ln)
    assert ppl.endswith("within the seeds' spread of fkl; not a difference at 3 seeds."), ppl
    rows["rkl"] = row(3.25, 3.5, 3.9)  # apart from the best again; then only the runner-up is tied
    rows["fkl"] = row(3.0, 3.3, 3.6)
    ppl = next(ln for ln in REPORT.verdicts(rows, 3) if "ppl on teacher text" in ln)
    assert ppl.endswith("within the seeds' spread of fkl; not a difference at 3 seeds."), ppl
    acc = next(ln for ln in REPORT.verdicts(rows, 3) if "acceptance" in ln)
    assert "(higher is better): rkl" in acc  # the highest mean wins where higher is better
    assert all("one seed" in ln for ln in REPORT.verdicts(rows, 1))
    # which way each column is better, said here, not read back from the table it checks
    better = {"ppl on teacher text": "lower", "KL(t‖s)": "lower", "KL(s‖t)": "lower", "acceptance": "higher",
              "teacher ppl of own text": "lower", "distinct-2": "higher"}
    for column, way in better.items():
        line = next(ln for ln in REPORT.verdicts(rows, 3) if column in ln)
        assert f"({way} is better): {'rkl' if way == 'higher' else 'seq'} " in line, line


def test_flops_by_hand():
    """N for a 2-layer, 32-wide student of GPT-2's vocabulary: per block 12 d^2 + 13 d (the four
    matrices, their biases, two LayerNorms), the final LayerNorm 2d, the output layer V d (tied:
    once); the position table not counted. Then 6N per trained position, 2N per sampled one."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=V, n_layer=2, n_head=2, n_embd=32))
    d = 32
    N = 2 * (12 * d * d + 13 * d) + 2 * d + V * d
    assert LAB.matmul_params(m) == N
    log = {"student_tokens": 1000, "sampled_tokens": 300}
    assert LAB.training_flops(log, N, 7, online=True) == (6 * N * 1000 + 2 * N * 300, 2 * 7 * 1000)
    assert LAB.training_flops(log, N, 7, online=False)[1] == 0
    # 02's writing: 2N per position of each kept sample, twice where it stored top-K (one more pass)
    data = {"train": [torch.zeros(10), torch.zeros(4)], "val": [torch.zeros(6)], "test": [torch.zeros(3)]}
    positions = 9 + 3 + 5 + 2
    assert LAB.writing_flops(data, 7) == 2 * 7 * positions
    data["train_topk_ids"] = [torch.zeros(9, 4), torch.zeros(3, 4)]
    assert LAB.writing_flops(data, 7) == 2 * 2 * 7 * positions


@pytest.mark.slow
def test_the_lab_trains_and_measures_every_method_then_tunes_and_seeds_two(start_copy, runs_in_process,
                                                                          monkeypatch):
    """A few steps of every method at one rate and seed: every row and column, the compute from 04's
    counts, the acceptance of one student against an independent computation. Then two methods with a
    grid of two rates and two seeds: the runs already trained are kept, each method's chosen rate is
    the best of its grid on its own objective, and the seeds spread."""
    keep_train_samples(start_copy, 8, n_val=4, n_test=6)  # 2 steps an epoch, 6 samples to measure on
    flags = ["07_methods.py", "--preset", "tiny", "--out", str(start_copy), "--warm-epochs", "1", "--epochs", "1",
             "--own-samples", "1"]
    r = run_here(flags + ["--lr-grid", "1e-2", "--seeds", "1", "--methods", "default,2025"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md = (start_copy / "methods.md").read_text()
    methods = LAB.GROUPS["default"] + LAB.GROUPS["2025"]
    assert not any(f"| {name} | " in md for name in LAB.GROUPS["caches"][1:])  # not asked for
    for name in ["teacher (reference)", "start (1 epochs of seq)", *methods]:
        assert f"| {name} | " in md
    for column in REPORT.COLUMNS:
        assert f" {column} |" in md and f"**{column}**" in md
    assert "one seed, so no spread" in md
    res = load_artifact(str(start_copy / "methods.pt"), "methods")
    assert res["steps"] == 2
    n_student = res["compute"]["student_N"]
    for name in methods:
        row = res["rows"][name]
        log = load_artifact(str(start_copy / row["folders"][0] / "train_log.pt"), "train_log")
        assert row["folders"][0] == f"methods/{name.replace(' ', '_')}/lr0.01-seed1337"
        assert log["settings"]["init"].endswith("methods/start/student_last.pt")
        run = row["runs"][0]
        assert run["student_flops"] == 6 * n_student * log["student_tokens"] + 2 * n_student * log["sampled_tokens"]
        assert (log["sampled_tokens"] > 0) == ("on-policy" in name)
        online = name not in ("seq", "soft", "soft (rest bucket)")  # the teacher run on every trained position
        assert run["teacher_flops"] == (2 * res["compute"]["teacher_N"] * log["student_tokens"] if online else 0)
    # the compute every method shares: the start (seq, 6N per position) and 02's writing, by hand
    start = load_artifact(str(start_copy / "methods" / "start" / "train_log.pt"), "train_log")
    assert start["sampled_tokens"] == 0 and res["compute"]["start_flops"] == 6 * n_student * start["student_tokens"]
    gen = load_artifact(str(start_copy / "generated.pt"), "generated")
    positions = sum(len(x) - 1 for split in ("train", "val", "test") for x in gen[split])
    assert res["compute"]["writing"] == 2 * 2 * res["compute"]["teacher_N"] * positions  # with its top-K pass
    assert res["rows"]["teacher"]["mean"]["fkl"] == 0 and res["rows"]["teacher"]["mean"]["acceptance"] == pytest.approx(1, abs=1e-4)
    # acceptance of one student: sum min(p, q) over the test positions, computed here
    student, _ = load_model(str(start_copy / res["rows"]["tvd"]["folders"][0] / "student_last.pt"), "student")
    teacher, _ = load_model(str(start_copy / "teacher.pt"), "teacher")
    assert res["compute"]["teacher_N"] == teacher.num_params() - teacher.transformer.wpe.weight.numel()  # a lookup
    total, n = 0.0, 0
    for s, P in zip(gen["test"], gen["test_prompt_lens"]):
        with torch.no_grad():
            p = F.softmax(teacher(s[None, :-1])[0][0].double(), -1)[P - 1:]
            q = F.softmax(student(s[None, :-1])[0][0].double(), -1)[P - 1:]
        total += torch.minimum(p, q).sum().item()
        n += len(s) - P
    assert res["rows"]["tvd"]["runs"][0]["acceptance"] == pytest.approx(total / n, rel=1e-4)
    assert (start_copy / "methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w, _ = matplotlib.image.imread(start_copy / "methods.png").shape
    assert h > 300 and w > 1000

    two = ["seq", "rkl-sampled+on-policy 1"]
    import common.perplexity
    measured = []
    real_score = common.perplexity.score_sampled
    monkeypatch.setattr(common.perplexity, "score_sampled",
                        lambda *a, **k: measured.append(a[4]) or real_score(*a, **k))
    import common.sampling
    prompts = []
    real_continue = common.sampling.continue_each
    monkeypatch.setattr(common.sampling, "continue_each", lambda m, p, *a, **k: prompts.append(p) or real_continue(m, p, *a, **k))
    import common.plumbing.artifacts
    loaded = []  # every checkpoint 07 reads: the grid is scored on the students measured, the last
    real_load = common.plumbing.artifacts.load_model
    monkeypatch.setattr(common.plumbing.artifacts, "load_model", lambda path, *a, **k: loaded.append(path) or real_load(path, *a, **k))
    again = run_here(flags + ["--lr-grid", "1e-3,1e-2", "--seeds", "2", "--methods", ",".join(two),
                              "--batch-size", "3", "--own-samples", "2"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert len(measured) == 2 * 6 and set(measured) == {3}  # 6 models, 2 measurements each, 3 at a time
    gen = load_artifact(str(start_copy / "generated.pt"), "generated")
    twice = [s[:P] for s, P in zip(gen["test"], gen["test_prompt_lens"]) for _ in range(2)]  # --own-samples 2
    own = [p for p in prompts if len(p) == len(twice) and all(torch.equal(a, b) for a, b in zip(p, twice))]
    assert len(own) == 6  # each model's own texts: every test prompt twice, in turn
    assert "=== start: trained earlier" in again.stdout and "=== seq, lr 0.01, seed 1337: trained earlier" in again.stdout
    res = load_artifact(str(start_copy / "methods.pt"), "methods")
    assert set(res["rows"]) == {"teacher", "start", *two}
    sampled = sum(len(x) - P for x, P in zip(gen["test"], gen["test_prompt_lens"]))
    assert (f"\nmeasuring on generated-test ({len(gen['test'])} samples, {sampled:,} sampled tokens; each model "
            f"writes 2 texts per prompt) | cpu fp32\n") in again.stdout
    for name, row in res["rows"].items():  # each run's printed line is its row in methods.pt
        for seed, run in zip((1337, 1338) if name in two else (None,), row["runs"]):
            said = (f"  {name:<24} " + (f"seed {seed} " if seed else "") +
                    f"ppl {run['ppl']:6.2f} | KL(t||s) {run['fkl']:.3f} | KL(s||t) {run['rkl']:.3f} | "
                    f"acceptance {run['acceptance']:.3f} | teacher ppl of own text {run['teacher_ppl_own']:6.2f} "
                    f"(+-{run['own_spread']:.0%}) | distinct-2 {run['distinct_2']:.3f}")
            assert said in again.stdout, said
    for name in two:
        row = res["rows"][name]
        assert set(row["grid"]) == {1e-3, 1e-2} and row["lr"] == min(row["grid"], key=row["grid"].get)
        for lr in row["grid"]:
            assert str(start_copy / f"methods/{name.replace(' ', '_')}/lr{lr:g}-seed1337/student_last.pt") in loaded
        for lr, v in row["grid"].items():  # each rate's printed objective, and the choice among them
            assert f"    {name} at lr {lr:g}: its own objective on val {v:.4f}\n" in again.stdout
        scores = ", ".join(f"{lr:g}: {v:.4f}" for lr, v in row["grid"].items())
        assert f"=== {name}: lr {row['lr']:g} chosen on val ({scores})\n" in again.stdout
        assert len(row["runs"]) == 2 and row["min"]["ppl"] < row["max"]["ppl"]  # two seeds, two students
        for key in row["runs"][0]:  # each number's mean, min and max over the two seeds' runs
            v = [run[key] for run in row["runs"]]
            if isinstance(v[0], (int, float)):
                assert [row[stat][key] for stat in ("mean", "min", "max")] == pytest.approx(
                    [sum(v) / 2, min(v), max(v)], rel=1e-12), key
        for seed, folder in zip((1337, 1338), row["folders"]):
            settings = load_artifact(str(start_copy / folder / "train_log.pt"), "train_log")["settings"]
            assert settings["seed"] == seed and settings["lr"] == row["lr"]
    # each column's verdict, worked out here from the two methods' seed ranges
    md = (start_copy / "methods.md").read_text()
    assert "with 2 seed(s) (1337, 1338:" in md  # the seeds the runs above were trained with
    for column, (key, _, better) in REPORT.COLUMNS.items():
        sign = 1 if better == "lower" else -1
        best, other = sorted(two, key=lambda n: sign * res["rows"][n]["mean"][key])
        b, o = res["rows"][best], res["rows"][other]
        overlap = o["min"][key] <= b["max"][key] and o["max"][key] >= b["min"][key]
        line = next(ln for ln in md.splitlines() if ln.startswith(f"- **{column}**"))
        assert f"better): {best} " in line
        assert line.endswith(f"within the seeds' spread of {other}; not a difference at 2 seeds." if overlap
                             else "apart from every other method over every seed."), line


def test_the_price_of_top_k_on_the_tiny_course(course_copy):
    """bench/price_of_top_k.py on the course's student: a row per K, the rest bucket never above
    the exact KL (merging tokens hides differences), the never-used tokens counted from the
    training text; the report says their embedding rows are zero exactly when they are (on the
    tiny teacher, unless a token the toy language uses is missing from 02's training text)."""
    r = run_here(["bench/price_of_top_k.py", "--preset", "tiny", "--out", str(course_copy)])
    assert r.returncode == 0, r.stderr
    md = (course_copy / "price_of_top_k.md").read_text()
    for k in PRICE.TOPK:
        assert f"| {k} | {6 * k} | " in md
    exact = float(re.search(r"full vocabulary: \*\*([\d.]+)\*\*", md).group(1))
    rest = [float(v) for v in re.findall(r"^\| \d+ \| \d+ \| [\d.]+ \| ([\d.]+) \|$", md, re.M)]
    assert len(rest) == len(PRICE.TOPK) and all(v <= exact + 1e-4 for v in rest)
    gen = load_artifact(str(course_copy / "generated.pt"), "generated")
    used = {int(t) for s in gen["train"] for t in s}
    assert f"the {V - len(used):,} tokens it never uses" in md
    wte = load_artifact(str(course_copy / "teacher.pt"), "teacher")["model"]["transformer.wte.weight"]
    zero = all(not wte[t].any() for t in range(V) if t not in used)
    assert ("embedding rows of the never-used tokens are all zero" in md) == zero


def test_the_lab_refuses_an_unknown_method_in_one_line(start_copy):
    r = run_here(["07_methods.py", "--preset", "tiny", "--out", str(start_copy), "--methods", "seq,kl"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "unknown method kl" in r.stderr
