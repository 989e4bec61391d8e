"""Shared fixtures: the repository on sys.path, a small reference GPT-2, and one tiny course run."""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_py(args, cwd=ROOT, env=None, timeout=900, **kw):
    """Run python with args in the repository; returns the CompletedProcess (text mode). The
    timeout leaves room for a machine three times slower than the slowest one measured (the lab's
    test, the longest run, took 86 s on a 2-core machine in 2026-12)."""
    e = {k: v for k, v in os.environ.items() if k not in ("KD_PRESET", "KD_OUT")}
    e.update(PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=timeout, **kw)


def run_here(args, env=None):
    """Run a lesson as `python args...` would, but in this process: no Python and torch start-up
    (about 3 s a run on 2 cores). Returns a CompletedProcess (exit code, stdout, stderr); a
    traceback escapes as the exception itself, which fails the test as surely."""
    import contextlib
    import io
    import runpy
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, cwd, environ = sys.argv[:], os.getcwd(), dict(os.environ)
    for k in ("KD_PRESET", "KD_OUT"):
        os.environ.pop(k, None)
    os.environ.update(env or {})
    sys.argv, before = list(args), torch.get_num_threads()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(os.path.join(ROOT, args[0]), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(before)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture
def runs_in_process(monkeypatch):
    """Lessons 07 and 09 run 03 and 04 as commands (common/plumbing/runs.py); here they run in this
    process instead (run_here), their output passed on as it would be."""
    from common.plumbing import runs

    def run_script(script, flags):
        r = run_here([script, *flags])
        print(r.stdout + r.stderr, end="")
        return r.returncode, (r.stdout + r.stderr).splitlines(keepends=True)
    monkeypatch.setattr(runs, "run_script", run_script)


def load_lesson(file):
    """A lesson script as a module (its main() does not run), to test the functions it defines."""
    spec = importlib.util.spec_from_file_location("lesson_" + file[:2], os.path.join(ROOT, file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hf_model(n_layer=2, n_embd=96, n_head=6, n_positions=64, vocab_size=500, seed=0):
    """A small random transformers GPT2LMHeadModel (the reference implementation), eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging
    logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions, vocab_size=vocab_size,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def ours_from_hf(ref):
    """Our GPT loaded with the reference's weights through our loader (save_pretrained layout)."""
    import tempfile

    from common.gpt2_weights import load_gpt2
    from common.model import GPT
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        config, state = load_gpt2(d)
    m = GPT(config)
    m.load_state_dict(state)
    return m.eval()


def run_notebook(nb, env, timeout=900, allow_errors=False, folder=ROOT):
    """Execute a notebook's cells in order in a fresh headless Jupyter kernel (nbclient + ipykernel),
    started in `folder` (the repository, or a folder the notebook was uploaded to alone, as on
    Colab); the outputs are written into nb. A failing cell raises nbclient's CellExecutionError
    unless allow_errors."""
    import nbclient
    e = {k: v for k, v in os.environ.items() if k not in ("KD_PRESET", "KD_OUT")}
    e.update(PYTHONUNBUFFERED="1", **env)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=allow_errors,
                                     resources={"metadata": {"path": str(folder)}})
    client.execute(env=e)
    return nb


R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"


def tiktoken_cache(folder):
    """A tiktoken cache holding r50k_base's ranks, as tiktoken leaves it after its one download: the
    file named by the sha1 of its URL, filled from common/gpt2.tiktoken (the same bytes)."""
    import hashlib
    os.makedirs(folder, exist_ok=True)
    shutil.copyfile(os.path.join(ROOT, "common", "gpt2.tiktoken"),
                    os.path.join(folder, hashlib.sha1(R50K_URL.encode()).hexdigest()))
    return str(folder)


def cell_text(cell):
    """What a code cell printed (stdout and stderr)."""
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.fixture(scope="session")
def course(tmp_path_factory):
    """The whole tiny course, run once, the way a learner runs it in Colab: the committed
    course.ipynb, alone in an empty folder (it writes common/ itself; the tokenizer's ranks come
    from tiktoken's cache, as after its one download), executed top to bottom in a headless kernel
    started with KD_PRESET=tiny. Returns the artifacts folder, everything the cells printed, the
    executed notebook (its folder is the artifacts folder's parent)."""
    import nbclient
    import nbformat
    folder = tmp_path_factory.mktemp("colab")
    out = folder / "artifacts"
    shutil.copyfile(os.path.join(ROOT, "course.ipynb"), folder / "course.ipynb")
    nb = nbformat.read(folder / "course.ipynb", as_version=4)
    env = {"KD_PRESET": "tiny", "KD_OUT": str(out), "KD_CACHE": str(folder / "cache"),
           "TIKTOKEN_CACHE_DIR": tiktoken_cache(folder / "tiktoken")}
    try:
        run_notebook(nb, env, folder=folder)
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"a cell of course.ipynb failed: {str(e)[-3000:]}")
    return out, "".join(cell_text(c) for c in nb.cells if c.cell_type == "code"), nb


@pytest.fixture
def course_copy(course, tmp_path):
    """A private copy of the tiny course's artifacts, to break or extend."""
    dst = tmp_path / "art"
    shutil.copytree(course[0], dst)
    return dst
