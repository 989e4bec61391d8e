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


def run_py(args, cwd=ROOT, env=None, timeout=300, **kw):
    """Run python with args in the repository; returns the CompletedProcess (text mode)."""
    e = {k: v for k, v in os.environ.items() if k not in ("KD_PRESET", "KD_OUT")}
    e.update(PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=timeout, **kw)


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


@pytest.fixture(scope="session")
def course(tmp_path_factory):
    """The whole tiny course, run once with run_all.sh; tests copy what they need from it."""
    out = tmp_path_factory.mktemp("course")
    r = subprocess.run(["bash", "run_all.sh", "--preset", "tiny", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


@pytest.fixture
def course_copy(course, tmp_path):
    """A private copy of the tiny course's artifacts, to break or extend."""
    dst = tmp_path / "art"
    shutil.copytree(course[0], dst)
    return dst
