"""The teacher's sampled cache (02 --cache-draws, 04 --soft-tail sampled; Sparse Logit Sampling,
Anshumann et al., 2025): its counts are draws from the teacher at T = 1, and the soft cross-entropy
on them has the full-vocabulary forward KL's gradient as its mean, where top-K's is biased."""
import torch

from common.distill import KD, sampled_kl, soft_kd_kl, token_divergence
from common.model import GPT, GPTConfig
from common.sampling import sampled_cache
from conftest import load_lesson, run_here

L02, L04 = load_lesson("02_generate.py"), load_lesson("04_train.py")


def teacher_logits(V=12, seed=0):
    """A teacher with a head, a tail and a few tokens it nearly never picks."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g) * 2


def test_a_sampled_cache_counts_the_teachers_own_draws():
    """Over 40,000 positions of one distribution, 8 draws each: every row's counts add up to 8, its
    ids are distinct, and the mean of counts / 8 is the teacher's p at T = 1 within 5 standard
    errors at every token (fails with the draws at T = 2, or a count of 1 for every distinct id)."""
    n, N, logits = 40_000, 8, teacher_logits()
    p = torch.softmax(logits, -1)
    ids, counts = sampled_cache(logits.expand(n, -1), N, torch.Generator().manual_seed(1))
    assert ids.dtype == torch.int32 and counts.dtype == torch.uint8 and ids.shape == counts.shape
    assert (counts.sum(-1) == N).all()
    kept = counts > 0
    for row in range(50):  # the ids a row keeps are distinct
        assert len(set(ids[row][kept[row]].tolist())) == int(kept[row].sum())
    t = torch.zeros(n, len(p)).scatter_add_(-1, ids.long(), counts.float() / N)
    se = (p * (1 - p) / (N * n)).sqrt()
    assert ((t.mean(0) - p).abs() / se).max() < 5


def test_the_sampled_caches_gradient_is_the_forward_kls_and_top_ks_is_not():
    """The mean gradient of sampled_kl over 20,000 caches of 4 draws each equals the gradient of the
    exact forward KL(p || q) within 5 Monte Carlo standard errors at every logit; top-K renormalised
    (K = 3, 04 --kd soft at T = 1) is off by more than 20 of them (its bias, measured). Fails with a
    count dropped, the draws at another temperature or the weights normalised twice."""
    M, N, V = 20_000, 4, 12
    t_logits, s = teacher_logits(V), torch.randn(V, generator=torch.Generator().manual_seed(2))
    ids, counts = sampled_cache(t_logits.expand(M, -1), N, torch.Generator().manual_seed(3))
    student = s.expand(M, -1).clone().requires_grad_()
    sampled_kl(student, ids, counts).sum().backward()
    grads = student.grad                                       # (M, V): one cache's gradient each
    exact_s = s.clone().requires_grad_()
    token_divergence(exact_s, t_logits, "fkl").backward()
    exact = exact_s.grad
    se = grads.std(0) / M ** 0.5
    assert ((grads.mean(0) - exact).abs() / se.clamp(min=1e-6)).max() < 5
    lp, top = torch.log_softmax(t_logits, -1).topk(3)
    topk_s = s.clone().requires_grad_()
    soft_kd_kl(topk_s, top, lp, T=1.0).backward()
    assert ((topk_s.grad - exact).abs() / se.clamp(min=1e-6)).max() > 20


def test_02_stores_at_each_position_draws_from_that_positions_distribution():
    """teacher_caches on a small, confident GPT: row t of a text's sampled cache comes from the
    teacher's distribution after token t (total variation under 0.3 with 255 draws, where the
    distributions of the positions around it are far off), its counts add up to the draws, and the
    top-K rows line up with the same positions (fails with the rows one position off)."""
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():
        teacher.transformer.wte.weight.mul_(200)  # confident: a few tokens take most of the mass
    seqs = [torch.randint(0, 50257, (n,)) for n in (9, 14)]
    cache = L02.teacher_caches(teacher, seqs, 4, 255, "cpu", torch.Generator().manual_seed(0))
    for seq, ids, counts, top in zip(seqs, cache["sampled_ids"], cache["sampled_counts"],
                                     cache["topk_ids"]):
        p = torch.softmax(teacher(seq[None, :-1])[0][0].float(), -1)     # (n - 1, V)
        assert len(ids) == len(top) == len(seq) - 1 and (counts.sum(-1) == 255).all()
        t = torch.zeros_like(p).scatter_add_(-1, ids.long(), counts.float() / 255)
        tv = 0.5 * (t - p).abs().sum(-1)
        assert tv.max() < 0.3 and (0.5 * (t[1:] - p[:-1]).abs().sum(-1)).min() > 0.3
        assert torch.equal(top.long(), p.topk(4).indices)


def test_04_trains_on_the_sampled_cache_when_told_and_on_top_k_otherwise():
    """texts_of hands 04's step the sampled ids and counts for --soft-tail sampled, the top-K ids and
    log-probs for the other tails (the first k with --soft-k), nothing for seq; loss_by_hand's
    sampled branch equals the loss the loop trains on."""
    def marked(value, width):  # a sample's stored rows (4 positions), each entry `value`
        return torch.full((4, width), value)
    data = {"train": [torch.arange(5)] * 2, "train_prompt_lens": [1, 1],
            "train_topk_ids": [marked(1, 8), marked(2, 8)], "train_topk_logprobs": [marked(-1, 8), marked(-2, 8)],
            "train_sampled_ids": [marked(3, 5), marked(4, 5)], "train_sampled_counts": [marked(5, 5), marked(6, 5)]}
    ids, counts = L04.texts_of([1], data, KD("soft", tail="sampled"))[2]
    assert torch.equal(ids[0], marked(4, 5)) and torch.equal(counts[0], marked(6, 5))
    ids, lps = L04.texts_of([1], data, KD("soft", tail="rest"))[2]
    assert torch.equal(ids[0], marked(2, 8)) and torch.equal(lps[0], marked(-2, 8))
    ids, lps = L04.texts_of([0], data, KD("soft", k=3))[2]  # --soft-k 3: the first 3 stored
    assert torch.equal(ids[0], marked(1, 3)) and torch.equal(lps[0], marked(-1, 3))
    assert L04.texts_of([1], data, KD("seq"))[2] is None
    B, L, V = 2, 5, 30
    logits, t = torch.randn(B, L, V), torch.randn(B, L, V) * 3
    y = torch.randint(0, V, (B, L))
    y[0, :2] = -100
    ids, counts = sampled_cache(t.view(-1, V), 16, torch.Generator().manual_seed(0))
    cache = (ids.view(B, L, -1), counts.view(B, L, -1))
    kd = KD("soft", alpha=0.3, T=1.0, tail="sampled")
    plain = L04.loss_by_hand(logits, y, kd, cache)
    total, _ = L04.loss_sums(logits, y, kd, cache)
    assert abs(plain.item() - total.item() / (y != -100).sum().item()) < 1e-5


def test_the_tiny_course_trains_from_a_sampled_cache(start_copy):
    """02 --cache-draws 16 writes the cache and says what a position of each costs; 04 --kd soft
    --soft-tail sampled trains on it; without the cache, or at another temperature, one line."""
    out = str(start_copy)
    r = run_here(["02_generate.py", "--preset", "tiny", "--out", out, "--num-samples", "24",
                  "--cache-draws", "16"])
    assert r.returncode == 0, r.stderr
    assert "top-32: 192 bytes" in r.stdout and "sampled, 16 draws:" in r.stdout
    data = torch.load(f"{out}/generated.pt", weights_only=False)
    assert all((c.sum(-1) == 16).all() for c in data["train_sampled_counts"])
    train = ["04_train.py", "--preset", "tiny", "--out", out, "--kd", "soft", "--soft-tail", "sampled"]
    r = run_here(train + ["--kd-temperature", "1", "--epochs", "1"])
    assert r.returncode == 0, r.stderr
    assert "sampled cache" in r.stdout
    written, computed = r.stdout.split("(loss_by_hand): ")[1].split("\n")[0].split("; as the loop computes it (loss_sums): ")
    assert written == computed
    r = run_here(train)
    assert r.returncode == 1 and "--soft-tail sampled needs --kd soft and --kd-temperature 1" in r.stderr
    r = run_here(["02_generate.py", "--preset", "tiny", "--out", out, "--num-samples", "24"])
    assert r.returncode == 0, r.stderr
    r = run_here(train + ["--kd-temperature", "1"])
    assert r.returncode == 1 and "run 02_generate.py with --cache-draws" in r.stderr


def test_a_batch_of_sampled_caches_of_unequal_widths_trains_as_each_alone():
    """make_batch pads each position's sampled ids and counts to the widest row's: a padded slot
    holds count 0, no draw, so a batch of a peaked and a flat teacher (few and many distinct ids)
    gives each text the loss it has alone, and every real position still counts its 16 draws (fails
    with padded slots counted as draws of token 0)."""
    from common.data import make_batch
    V, draws = 30, 16
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, V, (6,), generator=g), torch.randint(0, V, (4,), generator=g)]
    teachers = [torch.randn(5, V, generator=g) * 8, torch.randn(3, V, generator=g) * 0.1]  # peaked, flat
    caches = [sampled_cache(t, draws, g) for t in teachers]
    assert caches[0][0].size(-1) < caches[1][0].size(-1)
    kd = KD("soft", alpha=0.3, T=1.0, tail="sampled")
    logits = torch.randn(2, 5, V, generator=g)
    x, y, ids, counts = make_batch(seqs, [c[0] for c in caches], [c[1] for c in caches], prompt_lens=[1, 2])
    assert (counts.sum(-1)[y != -100] == draws).all()
    both, _ = L04.loss_sums(logits, y, kd, (ids, counts))
    alone = 0.0
    for i, (s, (a, b), P) in enumerate(zip(seqs, caches, [1, 2])):
        _, y1, ids1, counts1 = make_batch([s], [a], [b], prompt_lens=[P])
        alone += L04.loss_sums(logits[i:i + 1, :len(s) - 1], y1, kd, (ids1, counts1))[0].item()
    assert abs(both.item() - alone) <= 1e-5 * abs(alone)
