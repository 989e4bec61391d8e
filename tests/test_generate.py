"""Lesson 02: one sampling step written out agrees with sample_next; loops and duplicates are dropped and counted."""
import shutil

import torch

from common.plumbing.artifacts import load_artifact
from conftest import load_lesson, run_here


def test_repeated_ngram_fraction():
    lesson = load_lesson("02_generate.py")
    assert lesson.repeated_ngram_fraction(list(range(40))) == 0.0
    assert lesson.repeated_ngram_fraction([1, 2, 3] * 20) > 0.9      # a loop
    assert lesson.repeated_ngram_fraction([5, 6]) == 0.0              # too short to judge


def test_greedy_duplicates_are_dropped_and_reported(course, tmp_path):
    shutil.copy(course[0] / "teacher.pt", tmp_path / "teacher.pt")
    # greedy decoding writes the same text for the same prompt: the 6 unconditional samples are one text
    # (greedy text loops, so --max-repeat 0.95 keeps loops and leaves the duplicates to be caught)
    r = run_here(["02_generate.py", "--preset", "tiny", "--out", str(tmp_path), "--temperature", "0",
                "--num-samples", "12", "--prompts", "mixed", "--max-repeat", "0.95"])
    assert r.returncode == 0, r.stderr
    gen = load_artifact(str(tmp_path / "generated.pt"), "generated")
    kept = [tuple(t.tolist()) for t in gen["train"] + gen["val"] + gen["test"]]
    assert len(set(kept)) == len(kept)
    assert gen["dropped"]["duplicate"] == 5  # the 6 unconditional samples are one text
    assert f"kept {len(kept)} of 12" in r.stdout and len(kept) + sum(gen["dropped"].values()) == 12


def test_the_sampling_step_written_out_in_lesson_02_draws_what_sample_next_draws():
    """02's sampling_step_by_hand (one position, plain code) and common.sampling.sample_next (a batch)
    draw the same token from the same seed, for several settings and 200 seeds each; and the nucleus
    it reports is exactly the smallest set of top tokens holding top_p."""
    from common.sampling import sample_next
    from conftest import load_lesson
    lesson = load_lesson("02_generate.py")
    logits = torch.randn(500, generator=torch.Generator().manual_seed(0)) * 3
    for T, k, p in [(0.9, 50, 0.95), (1.0, 500, 0.5), (0.5, 5, 1.0), (1.3, 20, 0.8)]:
        for seed in range(200):
            by_hand, ids, probs = lesson.sampling_step_by_hand(logits, T, k, p, torch.Generator().manual_seed(seed))
            fast = sample_next(logits[None], T, k, p, torch.Generator().manual_seed(seed))
            assert by_hand == int(fast[0]) and by_hand in ids.tolist()
        full = torch.softmax(logits / T, -1).topk(k).values
        full = full / full.sum()
        n = int((full.cumsum(0) - full < p).sum())  # the smallest set reaching p
        assert len(ids) == n and torch.allclose(probs, full[:n] / full[:n].sum(), atol=1e-6)
    assert lesson.sampling_step_by_hand(logits, 0, 50, 0.9)[0] == int(logits.argmax())
    # on an exact top-p boundary (0.5, 0.25, 0.125, 0.125 are exact in binary), as sample_next: a token
    # whose higher-ranked tokens already hold top_p is left out
    exact = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()
    assert torch.softmax(exact, -1).tolist() == [0.5, 0.25, 0.125, 0.125]  # else a rounding, not a bug
    for p, n in ((0.5, 1), (0.75, 2), (0.875, 3), (1.0, 4)):  # (tokens 2 and 3 tie: either may rank third)
        kept = lesson.sampling_step_by_hand(exact, 1.0, 4, p)[1].tolist()
        assert len(kept) == n and kept[:2] == [0, 1][:n], p


def test_your_own_openings_from_a_file_are_used_and_split_by_opening(course, tmp_path):
    """--prompts-file: the topic openings are the file's (blank lines skipped), each opening's
    samples all in one split; a missing or empty file is refused in one line, nothing written."""
    from common.tokenizer import get_tokenizer
    shutil.copy(course[0] / "teacher.pt", tmp_path / "teacher.pt")
    mine = ["Tom was a brave", "Anna was a kind", "Lucy was a happy", "Sam was a young",
            "Ben was a busy", "Mia was a calm"]
    (tmp_path / "openings.txt").write_text("\n".join(mine[:3]) + "\n\n  \n" + "\n".join(mine[3:]) + "\n",
                                           encoding="utf-8")
    flags = ["02_generate.py", "--preset", "tiny", "--out", str(tmp_path), "--num-samples", "24",
             "--max-new-tokens", "24", "--prompts", "topics"]
    r = run_here(flags + ["--prompts-file", str(tmp_path / "openings.txt")])
    assert r.returncode == 0, r.stderr
    assert "(6 topic openings)" in r.stdout
    gen = load_artifact(str(tmp_path / "generated.pt"), "generated")
    enc = get_tokenizer()
    seen = {}
    for split in ("train", "val", "test"):
        assert set(gen[f"{split}_openings"]) <= set(mine)
        for s, P in zip(gen[split], gen[f"{split}_prompt_lens"]):
            seen.setdefault(enc.decode(s[1:P].tolist()), set()).add(split)
    assert set(seen) <= set(mine) and len(seen) >= 5
    assert all(len(splits) == 1 for splits in seen.values())  # no opening in two splits
    before = (tmp_path / "generated.pt").read_bytes()
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    for bad, said in [("missing.txt", "not found"), ("empty.txt", "holds no openings")]:
        r = run_here(flags + ["--prompts-file", str(tmp_path / bad)])
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and said in r.stderr, r.stderr
    assert (tmp_path / "generated.pt").read_bytes() == before


def test_keep_good_drops_texts_under_8_new_tokens_the_ending_not_counted():
    """7 new tokens (+ <|endoftext|>) are dropped, 8 are kept; a repeat of a kept text is a
    duplicate; the prompt never counts."""
    L02 = load_lesson("02_generate.py")
    EOT = 50256
    prompt = [EOT, 11, 12]
    seven = torch.tensor(prompt + list(range(100, 107)) + [EOT])
    eight = torch.tensor(prompt + list(range(200, 208)) + [EOT])
    kept, dropped = L02.keep_good([(seven, 3, 0), (eight, 3, 1), (eight.clone(), 3, 2)], max_repeat=0.5)
    assert [n for _, _, n in kept] == [1]
    assert dropped == {"empty or under 8 new tokens": 1, "repetitive": 0, "duplicate": 1}
