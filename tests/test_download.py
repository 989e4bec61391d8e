"""The GPT-2 download path, end to end, against a local HTTP server on 127.0.0.1."""
import hashlib
import http.server
import os
import threading

import pytest

import common.plumbing.download as gw
from common.gpt2_weights import load_gpt2
from common.plumbing.artifacts import LessonError
from common.plumbing.download import download_gpt2
from conftest import hf_model


class Hub:
    """Serves files like the hub's resolve/main URLs; supports Range (416 past the end); can cut the first
    transfer."""

    def __init__(self, files):
        self.files, self.requests, self.cut_next = files, [], False
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                hub.requests.append((self.path, self.headers.get("Range")))
                name = self.path.rsplit("/", 1)[-1]
                if name not in hub.files:
                    self.send_error(404)
                    return
                data = hub.files[name]
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):  # nothing after the end: "range not satisfiable"
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if hub.cut_next and name == "model.safetensors":
                    hub.cut_next = False
                    self.wfile.write(body[:len(body) // 2])  # then drop the connection mid-file
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    ref = hf_model()
    ref.save_pretrained(tmp_path / "src")
    files = {n: (tmp_path / "src" / n).read_bytes() for n in ("config.json", "model.safetensors")}
    server = Hub(files)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("KD_CACHE", str(tmp_path / "cache"))
    data = files["model.safetensors"]
    monkeypatch.setitem(gw.KNOWN_FILES, "gpt2", (len(data), hashlib.sha256(data).hexdigest()))
    yield server
    server.close()


def test_download_progress_resume_and_cache(hub, capsys):
    hub.cut_next = True
    folder = download_gpt2("gpt2")
    out = capsys.readouterr().out
    assert "MB/s" in out and "resuming model.safetensors" in out
    ranges = [r for p, r in hub.requests if p.endswith("model.safetensors")]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")  # resumed, not restarted
    assert (hub.files["model.safetensors"] == open(f"{folder}/model.safetensors", "rb").read())
    config, state = load_gpt2(folder)
    assert config.n_embd == 96
    n = len(hub.requests)
    download_gpt2("gpt2")  # cache hit: nothing fetched
    assert len(hub.requests) == n
    assert "cached" in capsys.readouterr().out


def test_checksum_mismatch_is_rejected(hub, monkeypatch, tmp_path):
    monkeypatch.setitem(gw.KNOWN_FILES, "gpt2", (len(hub.files["model.safetensors"]), "0" * 64))
    with pytest.raises(LessonError, match="corrupt.*sha256"):
        download_gpt2("gpt2")
    assert not (tmp_path / "cache" / "gpt2" / "model.safetensors").exists()


def test_corrupted_cache_is_fetched_again(hub, tmp_path):
    folder = download_gpt2("gpt2")
    with open(f"{folder}/model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00" * 16)
    download_gpt2("gpt2")
    assert open(f"{folder}/model.safetensors", "rb").read() == hub.files["model.safetensors"]


def test_unreachable_server_says_how_to_go_on(monkeypatch, tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("KD_CACHE", str(tmp_path))
    with pytest.raises(LessonError, match="--weights"):
        download_gpt2("gpt2-medium")


def test_a_part_file_that_already_holds_the_whole_file_is_checked_not_fetched_again(hub, tmp_path, capsys):
    """A run killed after the last byte but before the rename leaves a whole model.safetensors.part:
    the next run asks for the bytes after its end, the server answers 416 (range not satisfiable),
    and the .part is judged by its size and sha256: kept as the file if whole, else deleted with a
    line that says to run again (which then fetches it). Fails with a 416 taken as a final client
    error ("HTTP 416" on every later run)."""
    data = hub.files["model.safetensors"]
    part = tmp_path / "cache" / "gpt2" / "model.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data)
    folder = download_gpt2("gpt2")
    assert open(f"{folder}/model.safetensors", "rb").read() == data and not part.exists()
    ranges = [r for p, r in hub.requests if p.endswith("model.safetensors")]
    assert ranges == [f"bytes={len(data)}-"]  # one request, answered 416: nothing fetched again
    os.remove(f"{folder}/model.safetensors")
    part.write_bytes(data[:100] + bytes(16) + data[116:])  # the whole size, wrong bytes
    with pytest.raises(LessonError, match="corrupt.*sha256.*run again") as e:
        download_gpt2("gpt2")
    assert "\n" not in str(e.value) and not part.exists()
    download_gpt2("gpt2")
    assert open(f"{folder}/model.safetensors", "rb").read() == data


def test_the_hub_address_and_a_mirror_given_with_or_without_its_slash(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    path = "/openai-community/gpt2/resolve/main/config.json"
    assert gw.hub_url("gpt2", "config.json") == "https://huggingface.co" + path
    for mirror in ("https://hf-mirror.com", "https://hf-mirror.com/"):
        monkeypatch.setenv("HF_ENDPOINT", mirror)
        assert gw.hub_url("gpt2", "config.json") == "https://hf-mirror.com" + path
