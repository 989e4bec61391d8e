"""The toy language: deterministic, and it knows the exact probability of what it writes."""
import math
import random
import re

import pytest

from common import toy_language as tl
from common.plumbing.artifacts import load_artifact
from common.tokenizer import get_tokenizer


def test_the_same_seed_writes_the_same_documents():
    assert tl.documents(20, seed=5) == tl.documents(20, seed=5)
    assert tl.documents(20, seed=5) != tl.documents(20, seed=6)


def test_log_prob_of_a_written_text_is_the_sum_of_the_choices_made():
    rng = random.Random(11)
    for _ in range(40):
        text, logp = tl.sample_document(rng)
        assert tl.log_prob(text) == pytest.approx(logp, abs=1e-9)
        assert logp < 0


def test_texts_the_language_cannot_write_have_probability_zero():
    text = tl.documents(1, seed=3)[0]
    assert tl.log_prob(text + " The end.") == -math.inf       # more than a document
    assert tl.log_prob(text[:-1]) == -math.inf                # a sentence left open
    assert tl.log_prob(text.replace(".", "!", 1)) == -math.inf
    assert tl.log_prob("Tom was a happy farmer. She said hi.") == -math.inf
    counted = "Tom was a happy farmer. He counted the cats: one, two, three. There were four cats. He went to the park with Anna."
    assert tl.log_prob(counted) == -math.inf                  # the total must be the count
    assert tl.log_prob(counted.replace("four", "three")) > -math.inf


def test_a_tiny_document_by_hand():
    """'Tom was a happy farmer. Tom went to the park with Anna. ...' probability worked out by hand."""
    n_names, n_adj, n_jobs, n_places = len(tl.NAMES), len(tl.ADJECTIVES), len(tl.JOBS), len(tl.PLACES)
    text = "Tom was a happy farmer. Tom went to the park with Anna. He went to the park with Anna."
    p = (0.5 / n_names / n_adj / n_jobs          # "Tom was a happy farmer."
         * 0.2                                   # two sentences
         * (0.15 * 0.4 / n_places / (n_names - 1)) * (0.15 * 0.6 / n_places / (n_names - 1))
         * 0.5)                                  # no "In the end" sentence
    assert tl.log_prob(text) == pytest.approx(math.log(p), rel=1e-12)


def test_the_floor_is_the_mean_surprise_per_token():
    enc = get_tokenizer()
    texts = tl.documents(30, seed=4)
    nats = -sum(tl.log_prob(t) for t in texts)
    tokens = sum(len(enc.encode(t)) + 1 for t in texts)
    assert tl.entropy_per_token(texts, enc.encode) == pytest.approx(nats / tokens)
    assert 0.5 < nats / tokens < 2.0  # about one nat per GPT-2 token


def test_openings_are_beginnings_of_real_documents():
    assert len(set(tl.OPENINGS)) == 40
    for opening in tl.OPENINGS:
        name, _, article, adj = opening.split()
        assert name in tl.NAMES and adj in tl.ADJECTIVES and article == tl.article(adj)


def test_the_tiny_course_measures_something(course):
    """The targets of the offline course, loosened for robustness: the teacher within 1.5x of the
    language's floor, the student within 2x of the teacher on the teacher's held-out samples, and the
    teacher's samples written in the toy language's words."""
    out, _, _ = course
    ev = load_artifact(str(out / "eval.pt"), "eval")
    toy, test = ev["perplexity"]["toy-language"], ev["perplexity"]["generated-test"]
    assert ev["floor"]["toy-language"] < toy["teacher"] < 1.5 * ev["floor"]["toy-language"]
    assert test["student"] < 2 * test["teacher"]
    gen = load_artifact(str(out / "generated.pt"), "generated")
    words = [w.lower() for t in gen["test_texts"] + gen["train_texts"] for w in re.findall(r"[A-Za-z]+", t)]
    words = [w for w in words if w != "endoftext"]
    assert sum(w in tl.vocabulary() for w in words) >= 0.9 * len(words)


def test_log_prob_adds_up_every_way_of_writing_the_text(monkeypatch):
    """A grammar with two ways to write "xy" (0.3 and 0.7 for the first choice, then either of two
    branches that both write "y"): p("xy") = 1, the sum over derivations, not the likeliest one."""
    def tiny(w):
        w.choose([("a", 0.3), ("b", 0.7)])
        w.emit("x")
        w.emit("y" if w.choose([(1, 0.5), (2, 0.5)]) == 1 else "y")

    monkeypatch.setattr(tl, "_document", tiny)
    assert tl.log_prob("xy") == pytest.approx(0.0, abs=1e-12)
    assert tl.log_prob("xz") == -math.inf


def test_every_document_keeps_the_languages_rules():
    """Over 500 documents: each quote opened after "said," closes with '."'; a count says its last
    number again, with the plural it counted; a relative clause agrees with its noun; "an" goes before a
    vowel and "a" before the rest, in every noun phrase; every sentence and quote starts with a capital."""
    plurals = set(tl.NOUNS.values()) - set(tl.NOUNS)  # "fish" is both: left out
    for doc in tl.documents(500, 11):
        quotes = re.findall(r'said, "([^"]*)"', doc)
        assert doc.count('"') == 2 * len(quotes) and all(q.endswith(".") for q in quotes), doc
        for noun, counted, total, again in re.findall(r"counted the (\w+): ([\w, ]+)\. There were (\w+) (\w+)\.", doc):
            numbers = counted.split(", ")
            assert numbers == tl.NUMBERS[:len(numbers)] and total == numbers[-1] and again == noun, doc
            assert noun in tl.NOUNS.values()
        for noun, verb in re.findall(r"The (\w+) that [^.]* (was|were) \w+\.", doc):
            if noun in plurals or noun in tl.NOUNS and noun not in tl.NOUNS.values():
                assert (verb == "were") == (noun in plurals), doc
        for art, word in re.findall(r"\b([Aa]n?) (\w+)", doc):  # "an" before a vowel, "a" before the rest
            assert (art.lower() == "an") == (word[0] in "aeiou"), (art, word, doc)
        # every sentence, and every quote, starts with a capital letter
        starts = [doc[0]] + re.findall(r'\."? (\w)', doc) + re.findall(r'said, "(\w)', doc)
        assert all(c.isupper() for c in starts), doc


def test_the_teachers_training_stream_is_each_document_after_an_end_of_text():
    """token_stream: <|endoftext|> then a document, again and again (as GPT-2 saw its data: every
    document read after the separator), until at least n tokens; the documents are sample_document's
    under that rng."""
    encode, eot = get_tokenizer().encode, 50256
    stream = tl.token_stream(random.Random(5), 200, encode, eot)
    assert len(stream) >= 200 and stream[0] == eot and stream[-1] != eot
    starts = [i for i, t in enumerate(stream) if t == eot]
    docs = [stream[a + 1:b] for a, b in zip(starts, starts[1:] + [len(stream)])]
    rng = random.Random(5)
    assert all(d == encode(tl.sample_document(rng)[0]) for d in docs)
