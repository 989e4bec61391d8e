"""Shared fixtures: the repository on sys.path, a small reference GPT-2, and one tiny course run."""
import os

# pytest-xdist (-n 2 in pytest.ini) runs two workers, each with torch's threads for every core. An
# OpenMP thread that finds no work spins, by default: two tiny trainings side by side on 2 cores
# took 65 s so; with waiting threads asleep (PASSIVE), 24 s; one after the other, 30 s. Set before
# torch is imported, for the workers and every process they start.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib.util  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(items):
    """The tiny course first (the test that shows it), then the tests that do not need it, those
    that need its start (lessons 01-03), those that need all of it; the slow ones first in each:
    under xdist one worker runs the course while the other runs the rest, and the last tests
    handed out are short ones."""
    def order(item):
        uses = set(getattr(item, "fixturenames", ()))
        shows = "test_the_notebook_alone_runs_every_cell" in item.name
        return (not shows, bool({"course", "course_copy"} & uses),
                bool({"course_start", "start_copy"} & uses), item.get_closest_marker("slow") is None)
    items.sort(key=order)


def run_py(args, cwd=ROOT, env=None, timeout=900, **kw):
    """Run python with args in the repository; returns the CompletedProcess (text mode). The
    timeout leaves room for a machine three times slower than the slowest one measured (the lab's
    test, the longest run, took 86 s on a 2-core machine in 2026-12)."""
    e = {k: v for k, v in os.environ.items() if k not in ("KD_PRESET", "KD_OUT")}
    e.update(PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=e, capture_output=True, text=True,
                          timeout=timeout, **kw)


def run_here(args, env=None, threads=None):
    """Run a lesson as `python args...` would, but in this process: no Python and torch start-up
    (about 3 s a run on 2 cores), on `threads` torch threads if given (as OMP_NUM_THREADS would).
    Returns a CompletedProcess (exit code, stdout, stderr); a traceback escapes as the exception
    itself, which fails the test as surely."""
    import contextlib
    import io
    import runpy
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, cwd, environ = sys.argv[:], os.getcwd(), dict(os.environ)
    for k in ("KD_PRESET", "KD_OUT"):
        os.environ.pop(k, None)
    os.environ.update(env or {})
    sys.argv, before = [str(a) for a in args], torch.get_num_threads()
    torch.set_num_threads(threads or before)
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


def run_ranks(args, world=2, timeout=120):
    """Run a lesson as `torchrun --standalone --nproc_per_node=world` would: each rank a process
    with one thread and the environment torchrun gives its workers, but without torchrun's
    start-ups (a tiny launch: 4-4.7 s, against 9 s under torchrun, on 2 cores). The ranks are
    forked from a fork server: one process per test worker, started once, that has imported torch
    and the lessons' modules and runs nothing else. (Forked from the test worker itself, a rank
    copies its threads half-way through whatever they held; one such rank hung in a CI run, cause
    not found.) A rank still running after `timeout` seconds (a tiny run takes 3-10 s) prints
    every thread's stack and is stopped. Returns a CompletedProcess: rank 0's exit code, stdout and
    stderr, or those of the first rank that failed; `.others`: the other ranks' stdout."""
    import multiprocessing.connection
    import signal
    import socket
    import tempfile
    import time
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["conftest", "common.plumbing.distributed",
                                "common.plumbing.train_inputs", "common.plumbing.progress"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # (added to the fork server's)
    with tempfile.TemporaryDirectory() as d:
        ranks = [ctx.Process(target=_rank, args=(args, dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                                                 f"{d}/{r}")) for r in range(world)]
        for p in ranks:
            p.start()
        end, failed = time.time() + timeout, None
        while failed is None and time.time() < end and any(p.exitcode is None for p in ranks):
            multiprocessing.connection.wait([p.sentinel for p in ranks], timeout=1)
            failed = next((p for p in ranks if p.exitcode), None)  # the others would wait for it
        for p in ranks:
            if p.exitcode is None:
                os.kill(p.pid, signal.SIGKILL if failed else signal.SIGABRT)  # hung: show where
                p.join(10)
                p.kill()
                p.join()
        shown = failed or next((p for p in ranks if p.exitcode), ranks[0])
        i = ranks.index(shown)
        texts = [[open(f"{d}/{r}.{name}").read() if os.path.exists(f"{d}/{r}.{name}") else ""
                  for name in ("out", "err")] for r in range(world)]
    result = subprocess.CompletedProcess(args, shown.exitcode, *texts[i])
    result.others = [out for r, (out, _) in enumerate(texts) if r != i]  # what the other ranks printed
    return result


def _rank(args, env, files):
    """One rank of run_ranks, in a process of its own: the lesson run with `env` on one thread, its
    output in files.out and files.err (Python's and the C++ side's), its exit code the lesson's."""
    import faulthandler
    import traceback
    with open(f"{files}.out", "w") as out, open(f"{files}.err", "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        faulthandler.enable(err, all_threads=True)  # SIGABRT: every thread's stack, then exit
        try:
            r = run_here(args, env, threads=1)
            out.write(r.stdout)
            err.write(r.stderr)
            code = r.returncode
        except BaseException:
            err.write(traceback.format_exc())
            code = 1
    os._exit(code)  # at once: nothing of the fork server's to clean up


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


def run_notebook(nb, env, timeout=900, allow_errors=False, folder=ROOT, **hooks):
    """Execute a notebook's cells in order in a fresh headless Jupyter kernel (nbclient + ipykernel),
    started in `folder` (the repository, or a folder the notebook was uploaded to alone, as on
    Colab); the outputs are written into nb. A failing cell raises nbclient's CellExecutionError
    unless allow_errors. hooks: nbclient's, e.g. on_cell_executed."""
    import nbclient
    e = {k: v for k, v in os.environ.items() if k not in ("KD_PRESET", "KD_OUT")}
    e.update(PYTHONUNBUFFERED="1", **env)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=allow_errors,
                                     resources={"metadata": {"path": str(folder)}}, **hooks)
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


START = ("teacher.pt", "generated.pt", "student_init.pt")  # what lessons 01-03 leave


@pytest.fixture(scope="session")
def course(tmp_path_factory):
    """The whole tiny course, run once, the way a learner runs it in Colab: the committed
    course.ipynb, alone in an empty folder (it writes common/ itself; the tokenizer's ranks come
    from tiktoken's cache, as after its one download), its setup cell's PRESET set to "tiny",
    executed top to bottom in a headless kernel to where "Run all" stops. Returns the artifacts
    folder, everything the cells printed, the executed notebook (its folder is the artifacts
    folder's parent)."""
    import nbformat
    folder = shared_course(tmp_path_factory, "executed.ipynb")
    nb = nbformat.read(folder / "executed.ipynb", as_version=4)
    return folder / "artifacts", "".join(cell_text(c) for c in nb.cells if c.cell_type == "code"), nb


@pytest.fixture(scope="session")
def course_start(tmp_path_factory):
    """The tiny course's teacher, texts and student's start (START), copied aside as soon as the
    notebook's lesson 03 has run (when lesson 04 begins): under xdist, the tests that train from
    them start while the other worker's kernel runs lessons 04-06."""
    return shared_course(tmp_path_factory, "start/done") / "start"


def shared_course(tmp_path_factory, wait_for):
    """The folder the tiny course runs in, once this file exists in it. One folder for the whole
    run, shared by xdist's workers: whoever finds nobody running the course runs it (under a lock),
    the others look for the file they need; a course that failed fails them all with its cell."""
    from filelock import FileLock, Timeout
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    base = tmp_path_factory.getbasetemp()
    folder = base / "colab" if run is None else base.parent / f"colab-{run}"
    lock = FileLock(f"{folder}.lock")
    while not (folder / wait_for).exists():
        if (folder / "failed").exists():  # said once, not run again by every test that needs it
            pytest.fail((folder / "failed").read_text())
        try:
            lock.acquire(timeout=1)  # free: nobody runs the course (it finished, or it failed)
        except Timeout:
            continue                 # another worker runs it: look again
        try:
            if not (folder / wait_for).exists():
                run_course(folder)
        finally:
            lock.release()
    return folder


def as_a_learner_sets_it(nb, preset="tiny", more=False):
    """course.ipynb as a learner runs it: the setup cell's PRESET (and MORE_LESSONS) edited; without
    MORE_LESSONS, "Run all" ends at the cell that stops it (the cells after it are left out)."""
    setup = next(c for c in nb.cells if c.cell_type == "code" and "\nPRESET = " in c.source)
    setup.source = setup.source.replace('PRESET = "gpt2"', f'PRESET = "{preset}"')
    if more:
        setup.source = setup.source.replace("MORE_LESSONS = False", "MORE_LESSONS = True")
    else:
        stop = next(i for i, c in enumerate(nb.cells) if c.source.startswith("if not MORE_LESSONS"))
        nb.cells = nb.cells[:stop]
    return nb


def first_cell_of(nb, lesson):
    """The index of a lesson's first cell (its heading) in a notebook."""
    return next(i for i, c in enumerate(nb.cells) if c.source.startswith(f"## Lesson {lesson[:2]}:"))


def run_course(folder):
    """course.ipynb copied into folder and executed there as a learner would on the tiny preset,
    cell by cell: the start copied to folder/start as soon as lesson 04 begins, the executed
    notebook written last."""
    import nbclient
    import nbformat
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(os.path.join(ROOT, "course.ipynb"), folder / "course.ipynb")
    nb = as_a_learner_sets_it(nbformat.read(folder / "course.ipynb", as_version=4))
    out = folder / "artifacts"
    env = {"KD_CACHE": str(folder / "cache"), "TIKTOKEN_CACHE_DIR": tiktoken_cache(folder / "tiktoken")}
    lesson_04 = first_cell_of(nb, "04")

    def before(cell, cell_index, **_):
        if cell_index > lesson_04 and not (folder / "start").exists():
            (folder / "start").mkdir()
            for name in START:
                shutil.copyfile(out / name, folder / "start" / name)
            (folder / "start" / "done").touch()
    try:
        run_notebook(nb, env, folder=folder, on_cell_start=before)
    except nbclient.exceptions.CellExecutionError as e:
        (folder / "failed").write_text(f"a cell of course.ipynb failed: {str(e)[-3000:]}")
        pytest.fail((folder / "failed").read_text())
    nbformat.write(nb, folder / "executed.ipynb")


@pytest.fixture
def course_copy(course, tmp_path):
    """A private copy of the tiny course's artifacts, to break or extend."""
    dst = tmp_path / "art"
    shutil.copytree(course[0], dst)
    return dst


@pytest.fixture
def start_copy(course_start, tmp_path):
    """A private copy of the tiny course's teacher, texts and student's start (lessons 01-03)."""
    dst = tmp_path / "art"
    shutil.copytree(course_start, dst, ignore=shutil.ignore_patterns("done"))
    return dst
