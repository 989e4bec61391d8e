import socket

import pytest

from common.tokenizer import EOT, get_tokenizer


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network disabled in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    get_tokenizer.cache_clear()
    yield
    get_tokenizer.cache_clear()


def test_known_ids_round_trip_and_eot_offline(no_network):
    enc = get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(" the") == [262]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT] == [50256]
    assert enc.n_vocab == 50257
    text = "Distillation: 3 students,   two teachers!\n\nIt's GPT-2's vocabulary — ünïcödé 😀."
    assert enc.decode(enc.encode(text)) == text


def test_ranks_file_is_the_published_one():
    import hashlib

    from common.tokenizer import RANKS_FILE
    with open(RANKS_FILE, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == \
            "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def test_without_the_ranks_file_tiktokens_r50k_base_gives_the_same_tokenizer(tmp_path, monkeypatch):
    """course.ipynb uploaded alone has no common/gpt2.tiktoken: tiktoken's r50k_base (from its cache,
    as after its one download; filled here from our file, the same bytes) must tokenize alike."""
    from common import tokenizer
    from conftest import tiktoken_cache
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", tiktoken_cache(tmp_path / "cache"))
    ours = tokenizer.get_tokenizer()
    monkeypatch.setattr(tokenizer, "RANKS_FILE", str(tmp_path / "absent.tiktoken"))
    tokenizer.get_tokenizer.cache_clear()
    try:
        theirs = tokenizer.get_tokenizer()
    finally:
        tokenizer.get_tokenizer.cache_clear()
    assert theirs.name == "r50k_base" and theirs is not ours
    assert theirs._mergeable_ranks == ours._mergeable_ranks and theirs._pat_str == ours._pat_str
    assert theirs._special_tokens == ours._special_tokens and theirs.n_vocab == ours.n_vocab == 50257
    text = "Hello world! <|endoftext|> It's 2024: naïve café, 3.14159 ...\n\n  indented"
    assert theirs.encode(text, allowed_special="all") == ours.encode(text, allowed_special="all")
