"""Pruning (03_student.py --prune, common/prune.py): the slicing against a forward pass written here
from the teacher's weights at the kept indices, each importance score against a brute force, and on
the tiny course: the most important units beat the least important and random ones."""
import math
import re

import pytest
import torch
from torch.nn import functional as F

from common.data import make_batch
from common.model import GPT, GPTConfig
from common.plumbing.artifacts import load_artifact, load_model
from common.prune import choose, cut, hidden_skipping
from conftest import load_lesson, run_here

STUDENT = load_lesson("03_student.py")


def teacher(seed=0, n_layer=3, n_embd=24, n_head=4, vocab=97):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(block_size=16, vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                      n_embd=n_embd)).double().eval()
    with torch.no_grad():  # biases and LayerNorms away from their 0 and 1: a missed slice shows
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.5)
    return m


def by_hand(m, x, layers, heads, neurons, channels):
    """The logits of the pruned model, computed here from m's weights at the kept indices: per head
    its own q, k, v rows, attention written out, every LayerNorm over the kept channels only."""
    W = {k: v for k, v in m.state_dict().items()}
    C, hs = m.config.n_embd, m.config.n_embd // m.config.n_head
    c = torch.as_tensor(channels)

    def ln(h, name):
        mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        return (h - mu) / torch.sqrt(var + 1e-5) * W[name + ".weight"][c] + W[name + ".bias"][c]

    T = x.size(1)
    h = W["transformer.wte.weight"][x][..., c] + W["transformer.wpe.weight"][:T, c]
    for layer, kept_heads, n in zip(layers, heads, neurons):
        p = f"transformer.h.{layer}."
        a = ln(h, p + "ln_1")
        Wqkv, bqkv = W[p + "attn.c_attn.weight"], W[p + "attn.c_attn.bias"]
        out = W[p + "attn.c_proj.bias"][c].clone()
        for hd in kept_heads:
            q, k, v = (a @ Wqkv[j * C + hd * hs: j * C + (hd + 1) * hs][:, c].T
                       + bqkv[j * C + hd * hs: j * C + (hd + 1) * hs] for j in range(3))
            att = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
            att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            y = att.softmax(-1) @ v                                       # (B, T, hs)
            out = out + y @ W[p + "attn.c_proj.weight"][c][:, hd * hs:(hd + 1) * hs].T
        h = h + out
        a = ln(h, p + "ln_2")
        g = F.gelu(a @ W[p + "mlp.c_fc.weight"][n][:, c].T + W[p + "mlp.c_fc.bias"][n],
                   approximate="tanh")
        h = h + g @ W[p + "mlp.c_proj.weight"][c][:, n].T + W[p + "mlp.c_proj.bias"][c]
    return ln(h, "transformer.ln_f") @ W["transformer.wte.weight"][:, c].T


def test_keeping_every_unit_reproduces_the_teacher_exactly():
    t = teacher()
    L, nh, C = t.config.n_layer, t.config.n_head, t.config.n_embd
    same = cut(t, list(range(L)), [list(range(nh))] * L, [torch.arange(4 * C)] * L,
               torch.arange(C))
    x = torch.randint(0, 97, (2, 16))
    assert torch.equal(same(x)[0], t(x)[0])


def test_the_pruned_model_is_the_teacher_at_the_kept_indices():
    """Scattered indices, so that a slice taken as a prefix (an unsliced LayerNorm or position
    table), q's heads taken for k and v too, or an output layer untied from the embedding fail."""
    t = teacher()
    layers, heads = [0, 2], [[1, 3], [0, 2]]
    g = torch.Generator().manual_seed(0)
    neurons = [torch.randperm(96, generator=g)[:48].sort().values for _ in layers]  # 4 x 12
    channels = torch.tensor([1, 2, 4, 6, 7, 11, 12, 15, 16, 19, 20, 23])
    small = cut(t, layers, heads, neurons, channels)
    assert (small.config.n_layer, small.config.n_head, small.config.n_embd) == (2, 2, 12)
    assert small.lm_head.weight is small.transformer.wte.weight  # still tied
    x = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        got, want = small(x)[0], by_hand(t, x, layers, heads, neurons, channels)
    assert torch.allclose(got, want, atol=1e-10), (got - want).abs().max()


def calibration(seed=1, n=6, vocab=97):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, vocab, (int(torch.randint(5, 16, (1,), generator=g)),), generator=g)
            for _ in range(n)]
    return [make_batch(seqs[i:i + 3]) for i in range(0, n, 3)]  # padded: padding not counted


def test_each_importance_score_against_a_brute_force():
    """Heads: ||softmax(q k^T / sqrt(hs)) v|| from q, k, v by hand; neurons: |GELU(ln_2(h) W + b)|
    from the weights; channels: |LayerNorm output| summed over ln_1, ln_2 of every block and ln_f;
    blocks: the loss with the block's output replaced by its input. Means over real positions."""
    t = teacher()
    batches = calibration()
    score = STUDENT.importance(t, batches)
    L, nh, C = t.config.n_layer, t.config.n_head, t.config.n_embd
    hs = C // nh
    heads, neurons, channels = torch.zeros(L, nh), torch.zeros(L, 4 * C), torch.zeros(C)
    skipped, n = torch.zeros(L), 0
    with torch.no_grad():
        for x, y in batches:
            real = y != -100
            n += int(real.sum())
            h = t.transformer.wte(x) + t.transformer.wpe(torch.arange(x.size(1)))
            for i, b in enumerate(t.transformer.h):
                a = b.ln_1(h)
                channels += a.abs()[real].sum(0)
                q, k, v = b.attn.c_attn(a).split(C, -1)
                T = x.size(1)
                for hd in range(nh):
                    s = slice(hd * hs, (hd + 1) * hs)
                    att = q[..., s] @ k[..., s].transpose(-1, -2) / math.sqrt(hs)
                    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
                    heads[i, hd] += (att.softmax(-1) @ v[..., s]).norm(dim=-1)[real].sum()
                h = h + b.attn(a)
                a = b.ln_2(h)
                channels += a.abs()[real].sum(0)
                neurons[i] += F.gelu(a @ b.mlp.c_fc.weight.T + b.mlp.c_fc.bias,
                                     approximate="tanh").abs()[real].sum(0)
                h = h + b.mlp(a)
            channels += t.transformer.ln_f(h).abs()[real].sum(0)
            for skip in range(L):
                h2 = t.transformer.wte(x) + t.transformer.wpe(torch.arange(x.size(1)))
                for i, b in enumerate(t.transformer.h):
                    h2 = h2 if i == skip else b(h2)
                logits = t.lm_head(t.transformer.ln_f(h2))
                skipped[skip] += F.cross_entropy(logits[real], y[real], reduction="sum")
    for key, want in (("heads", heads), ("neurons", neurons), ("channels", channels),
                      ("blocks", skipped)):
        assert torch.allclose(score[key].double(), want.double() / n, rtol=1e-6), key
    assert score["heads"].std() > 0 and score["blocks"].std() > 0


def test_choose_keeps_the_top_bottom_or_random_units_in_order():
    s = torch.tensor([0.5, 3.0, 1.0, 2.0, 0.1])
    assert choose(s, 3).tolist() == [1, 2, 3]
    assert choose(s, 2, "bottom").tolist() == [0, 4]
    seen = set()
    for seed in range(40):  # "random": any 3 of the 5, each unit kept by some seed
        r = choose(s, 3, "random", torch.Generator().manual_seed(seed)).tolist()
        assert len(set(r)) == 3 and r == sorted(r) and set(r) <= set(range(5))
        seen.add(tuple(r))
    assert set().union(*seen) == set(range(5)) and len(seen) > 5


def test_hidden_skipping_nothing_is_the_model():
    t = teacher()
    x = torch.randint(0, 97, (2, 9))
    assert torch.equal(hidden_skipping(t, x), t.hidden(x))


def held_out(path):
    gen = load_artifact(str(path / "generated.pt"), "generated")
    return gen["val"], gen["val_prompt_lens"]


def test_the_tiny_teacher_pruned_by_importance_beats_random_and_least_important(start_copy):
    """03 --prune on the tiny course, depth and width cut (2/64/4 -> 1/32/2): it writes a student
    of that shape, and the importance is used: keeping the least important units (the ranking
    flipped) or random ones is worse on held-out text before any training."""
    r = run_here(["03_student.py", "--preset", "tiny", "--out", str(start_copy), "--prune",
                  "--n-layer", "1"])
    assert r.returncode == 0, r.stderr
    ppl = {name.strip(): float(v.replace(",", "")) for name, v in
           re.findall(r"^  ([a-z][a-z :()]+?)\s+([\d,]+\.\d\d)$", r.stdout, re.M)}
    assert set(ppl) == {"teacher", "pruned: the most important", "random units kept",
                        "the least important kept", "random init (no teacher)"}, r.stdout
    top = ppl["pruned: the most important"]
    assert top * 1.5 < ppl["random units kept"] and top * 1.5 < ppl["the least important kept"]
    assert ppl["teacher"] < top < ppl["random init (no teacher)"] / 100
    # the scores are measured on the first 64 train texts, every token after the first scored (text, not
    # prompts and continuations): the teacher's loss there, printed, recomputed here
    from common.perplexity import sequences_nll
    calib = load_artifact(str(start_copy / "generated.pt"), "generated")["train"][:64]
    teacher, _ = load_model(str(start_copy / "teacher.pt"), "teacher")
    nats, n = sequences_nll(teacher, calib, prompt_lens=[1] * len(calib))
    said = re.search(r"importance on 64 texts of generated.pt's train split \(loss ([\d.]+)\):\n", r.stdout)
    assert said and float(said.group(1)) == pytest.approx(nats / n, abs=6e-4)
    # the kept line names the block 03 kept: the one whose skipping costs the most, as printed
    skipped = [float(v) for v in re.search(r"blocks, the loss when skipped: 0: ([\d.]+), 1: ([\d.]+)\n",
                                           r.stdout).groups()]
    assert skipped[0] != skipped[1]
    keep = skipped.index(max(skipped))
    assert f"  kept: blocks [{keep}] of 2, 2 heads of 4 and 128 MLP neurons of 256 in each, 32 channels of 64\n" in r.stdout
    student, ckpt = load_model(str(start_copy / "student_init.pt"), "student_init")
    assert (student.config.n_layer, student.config.n_embd, student.config.n_head) == (1, 32, 2)
    assert ckpt["pruned"] and not ckpt["from_teacher"]
    # the printed numbers are the models' own: the saved student's perplexity, recomputed
    from common.perplexity import sequences_perplexity
    val, P = held_out(start_copy)
    assert sequences_perplexity(student, val[:64], 8, P[:64]) == pytest.approx(top, abs=0.006)


@pytest.mark.parametrize("flags, said", [
    (["--n-embd", "128", "--n-head", "8"], "--n-embd 128 is more than its 64"),
    (["--n-layer", "3"], "--n-layer 3 is more than its 2"),
    (["--n-embd", "32", "--n-head", "4"], "--n-embd must be --n-head x 16 = 64, not 32"),
    (["--from-teacher"], "choose one start"),
])
def test_prune_refuses_a_shape_it_cannot_cut_in_one_line(start_copy, flags, said):
    before = (start_copy / "student_init.pt").read_bytes()
    r = run_here(["03_student.py", "--preset", "tiny", "--out", str(start_copy), "--prune",
                  *flags])
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and said in r.stderr, r.stderr
    assert (start_copy / "student_init.pt").read_bytes() == before  # nothing written


def test_prune_without_the_generated_texts_says_to_run_02(start_copy):
    (start_copy / "generated.pt").unlink()
    r = run_here(["03_student.py", "--preset", "tiny", "--out", str(start_copy), "--prune"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "02_generate.py" in r.stderr
