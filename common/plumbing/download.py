"""Downloading a large file the careful way: progress, resume, atomic rename, size and sha256
checks.

The bytes go to `<dest>.part`; if the connection drops we ask the server for the rest with an HTTP
Range header instead of starting over. Only a complete, verified file is renamed to `dest`, so a
file at `dest` is always whole.
"""
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request

from common.plumbing.artifacts import LessonError

# Some hosts refuse Python's default User-Agent; this one reads like a browser.
USER_AGENT = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
              "Chrome/124.0 Safari/537.36")
CHUNK = 1 << 20


def cache_dir():
    """Where downloads are kept: $KD_CACHE, else ~/.cache/kd-course."""
    home_cache = os.path.join(os.path.expanduser("~"), ".cache", "kd-course")
    return os.environ.get("KD_CACHE") or home_cache


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path, size, sha256):
    """None if the file is as expected, else what is wrong with it."""
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        return f"{actual:,} bytes instead of {size:,}"
    if sha256 is not None and sha256_of(path) != sha256:
        return "its sha256 does not match"
    return None


def download(url, dest, size=None, sha256=None, retries=3, timeout=30, quiet=False):
    """Fetch url to dest unless a verified copy is already there; returns dest."""
    if os.path.exists(dest):
        problem = _verify(dest, size, sha256)
        if problem is None:
            if not quiet:
                print(f"  cached: {dest}")
            return dest
        print(f"  cached {dest} is damaged ({problem}): fetching it again")
        os.remove(dest)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    name = os.path.basename(dest)
    for attempt in range(1, retries + 1):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        headers = {"User-Agent": USER_AGENT}
        if have:
            headers["Range"] = f"bytes={have}-"  # ask only for the bytes we do not have yet
        try:
            request = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(request, timeout=timeout) as r:
                if have and r.status != 206:  # the server ignored Range and sends the whole file
                    have = 0
                length = r.headers.get("Content-Length")
                total = have + int(length) if length is not None else size
                if have and not quiet:
                    print(f"  resuming {name} at {have / 1e6:.1f} MB")
                _copy(r, part, "ab" if have else "wb", have, total, name, quiet)
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # "range not satisfiable": .part holds the whole file
                break
            if 400 <= e.code < 500:
                raise LessonError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
            error = f"HTTP {e.code}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            error = getattr(e, "reason", None) or e.__class__.__name__
        if attempt == retries:
            kept = (f"; the partial file {part} is kept and the next run resumes it"
                    if os.path.exists(part) else "")
            raise LessonError(f"download of {url} failed ({error}){kept}")
        print(f"  connection lost ({error}); retrying ({attempt}/{retries - 1})")
        time.sleep(attempt)
    problem = _verify(part, size, sha256)
    if problem is not None:
        os.remove(part)
        raise LessonError(f"downloaded {name} is corrupt ({problem}) and was deleted: run again to "
                          f"re-fetch it")
    os.replace(part, dest)
    return dest


def _copy(response, part, mode, have, total, name, quiet):
    start = last = time.time()
    done = have
    with open(part, mode) as f:
        while True:
            block = response.read(CHUNK)
            if not block:
                break
            f.write(block)
            done += len(block)
            now = time.time()
            if not quiet and (now - last > 0.5 or (total and done == total)):
                last = now
                rate = (done - have) / max(now - start, 1e-9)
                eta = f"{(total - done) / rate:.0f}s" if total and rate > 0 else "?"
                of = f"/{total / 1e6:.1f}" if total else ""
                sys.stdout.write(f"\r  {name}: {done / 1e6:.1f}{of} MB | {rate / 1e6:.1f} MB/s | "
                                 f"eta {eta}   ")
                sys.stdout.flush()
    if total and done < total:  # the server closed the connection early
        raise http.client.IncompleteRead(b"", total - done)
    if not quiet:
        sys.stdout.write("\n")


# --- GPT-2's files on the Hugging Face hub ---
# Published size and sha256 of gpt2 (124M)'s model.safetensors, to catch a corrupt download.
KNOWN_FILES = {
    "gpt2": (548_105_171, "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"),
}


def hub_url(name, filename):
    """The file's address on the Hugging Face hub; HF_ENDPOINT points to a mirror instead."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    return f"{endpoint}/openai-community/{name}/resolve/main/{filename}"


def download_gpt2(name):
    """Download config.json and model.safetensors of openai-community/<name> into the cache;
    returns the folder."""
    folder = os.path.join(cache_dir(), name)
    size, sha = KNOWN_FILES.get(name, (None, None))
    try:
        download(hub_url(name, "config.json"), os.path.join(folder, "config.json"), quiet=True)
        download(hub_url(name, "model.safetensors"), os.path.join(folder, "model.safetensors"),
                 size=size, sha256=sha)
    except LessonError as e:
        raise LessonError(f"{e}. Without internet, download the GPT-2 files elsewhere and pass "
                          f"their folder with --weights, or use --preset tiny") from None
    return folder
