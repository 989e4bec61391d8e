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
