"""Lesson 05's WikiText-2 download: fetched from a local server, checked, cached, unzipped."""
import hashlib
import http.server
import importlib.util
import io
import os
import threading
import zipfile

import pytest

from conftest import ROOT


def load_lesson05():
    spec = importlib.util.spec_from_file_location("lesson05", os.path.join(ROOT, "05_evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wikitext_is_downloaded_checked_and_cached(tmp_path, monkeypatch):
    text = " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 is a tactical role @-@ playing game .\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("wikitext-2-raw/wiki.test.raw", text)
    data = buf.getvalue()
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            hits.append(self.headers.get("User-Agent"))
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        lesson = load_lesson05()
        monkeypatch.setenv("KD_CACHE", str(tmp_path))
        monkeypatch.setattr(lesson, "WIKITEXT_URLS", [f"http://127.0.0.1:{server.server_address[1]}/w.zip"])
        monkeypatch.setattr(lesson, "WIKITEXT_SIZE", len(data))
        monkeypatch.setattr(lesson, "WIKITEXT_SHA256", hashlib.sha256(data).hexdigest())
        assert lesson.wikitext2_test() == text
        assert len(hits) == 1 and hits[0].startswith("Mozilla/5.0")  # a browser-like User-Agent
        assert lesson.wikitext2_test() == text and len(hits) == 1    # the second time from the cache
        monkeypatch.setattr(lesson, "WIKITEXT_SHA256", "0" * 64)      # a corrupt file is not used
        os.remove(tmp_path / "wikitext-2-raw-v1.zip")
        assert lesson.wikitext2_test() is None
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_offline_lesson_05_says_wikitext_was_skipped_and_goes_on(course_copy, tmp_path):
    """No network (an address nobody listens on): 05 with --wikitext says in one line that WikiText-2
    could not be downloaded, evaluates the other sets, and records the skip in eval.pt."""
    from common.plumbing.artifacts import load_artifact
    from conftest import run_here
    r = run_here(["05_evaluate.py", "--preset", "tiny", "--out", str(course_copy), "--wikitext"],
               env={"KD_WIKITEXT_URL": "http://127.0.0.1:9/none.zip", "KD_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert "skipped wikitext2: could not download it" in r.stdout and "Traceback" not in r.stderr
    ev = load_artifact(str(course_copy / "eval.pt"), "eval")
    assert "wikitext2" in ev["skipped"] and "generated-test" in ev["perplexity"]
