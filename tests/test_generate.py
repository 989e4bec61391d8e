"""Lesson 02: one sampling step written out agrees with sample_next; loops and duplicates are dropped and counted."""
import shutil

import torch

from common.artifacts import load_artifact
from conftest import load_lesson, run_py


def test_repeated_ngram_fraction():
    lesson = load_lesson("02_generate.py")
    assert lesson.repeated_ngram_fraction(list(range(40))) == 0.0
    assert lesson.repeated_ngram_fraction([1, 2, 3] * 20) > 0.9      # a loop
    assert lesson.repeated_ngram_fraction([5, 6]) == 0.0              # too short to judge


def test_greedy_duplicates_are_dropped_and_reported(course, tmp_path):
    shutil.copy(course[0] / "teacher.pt", tmp_path / "teacher.pt")
    # greedy decoding writes the same text for the same prompt: the 6 unconditional samples are one text
    # (greedy text loops, so --max-repeat 0.95 keeps loops and leaves the duplicates to be caught)
    r = run_py(["02_generate.py", "--preset", "tiny", "--out", str(tmp_path), "--temperature", "0",
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
