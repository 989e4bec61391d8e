"""The plumbing lesson 04 calls: common/plumbing/train_state.py (saving, resuming, refusals, .prev) and
common/plumbing/distributed.py (process start, sums and random-number states across processes), and the
Ctrl-C context manager in common/plumbing/artifacts.py."""
import os
import signal
import socket
import sys

import pytest
import torch

from common.model import GPT, GPTConfig
from common.plumbing import distributed, train_state
from common.plumbing.artifacts import LessonError, ctrl_c_finishes_the_step
from common.plumbing.distributed import Processes


def parts(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, optimizer, scaler


def one_step(model, optimizer):
    loss = model(torch.arange(8)[None] % 16, torch.arange(1, 9)[None] % 16)[1]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


SETTINGS = {"kd": "seq", "lr": 0.01, "grad_clip": 1.0, "dtype": "fp32"}


def new_state(path, settings=SETTINGS, config=None, total_steps=10, **kw):
    """A TrainState for a run with these settings, of the student {"n_layer": 1}."""
    return train_state.TrainState(str(path), settings, config or {"n_layer": 1}, total_steps, **kw)


def loaded(path, procs, model, optimizer, scaler, settings=SETTINGS, config=None):
    """A fresh state filled in from train_state.pt, as a --resume does."""
    state = new_state(path, settings, config)
    train_state.load(state, procs, model, optimizer, scaler)
    return state


def saved_state(tmp_path, procs=None, step=3, total_steps=10, settings=SETTINGS, rng=None):
    """A train_state.pt after one real optimizer step, as 04 saves it."""
    model, optimizer, scaler = parts()
    one_step(model, optimizer)
    procs = procs or Processes(ddp=False, rank=0, world=1, device="cpu")
    path = str(tmp_path / "train_state.pt")
    state = new_state(path, settings, total_steps=total_steps, step=step, best_val=2.5)
    state.history["loss"] = [3.0, 2.0, 1.0]
    train_state.save(state, procs, model, optimizer, scaler)
    if rng is not None:  # the states of other ranks, as 2 processes would have saved them
        st = torch.load(path, weights_only=True)
        st["rng"] = rng
        torch.save(st, path)
    return path, model, optimizer


def test_save_then_load_gives_back_the_weights_optimizer_and_history(tmp_path):
    path, model, optimizer = saved_state(tmp_path)
    fresh, fresh_opt, scaler = parts(seed=1)
    procs = Processes(ddp=False, rank=0, world=1, device="cpu")
    state = loaded(path, procs, fresh, fresh_opt, scaler)
    assert state.step == 3 and state.best_val == 2.5 and state.history["loss"] == [3.0, 2.0, 1.0]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    one_step(model, optimizer)
    one_step(fresh, fresh_opt)  # Adam's moments came back too: the next step is the same
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_an_fp16_gradscalers_scale_and_growth_tracker_come_back(tmp_path):
    """An enabled scaler with a non-default scale and growth tracker (what fp16 training on a T4
    leaves in it) through a save and a load: a resumed run must skip and grow as the first would."""
    model, optimizer, _ = parts()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    for overflow in (False, True, False):  # one growth step counted, one overflow halves the scale
        loss = model(torch.arange(8)[None] % 16, torch.arange(1, 9)[None] % 16)[1]
        scaler.scale(loss * (float("inf") if overflow else 1.0)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert scaler.get_scale() == 2.0**9 and scaler._get_growth_tracker() == 1
    procs = Processes(ddp=False, rank=0, world=1, device="cpu")
    path = str(tmp_path / "train_state.pt")
    train_state.save(new_state(path, total_steps=9, step=3), procs, model, optimizer, scaler)
    fresh, fresh_opt, _ = parts(seed=1)
    fresh_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    loaded(path, procs, fresh, fresh_opt, fresh_scaler)
    assert fresh_scaler.get_scale() == 2.0**9 and fresh_scaler._get_growth_tracker() == 1
    assert fresh_scaler.state_dict() == scaler.state_dict()


def test_the_best_weights_are_written_once_when_they_are_the_current_ones(tmp_path):
    """At an epoch end with a new best, the best IS the current student: train_state.pt holds it once
    (its size drops by the weights) and a load gives it back exactly; a best from an earlier step is
    stored whole."""
    from common.plumbing.artifacts import model_checkpoint
    model, optimizer, scaler = parts()
    one_step(model, optimizer)
    procs = Processes(ddp=False, rank=0, world=1, device="cpu")
    sizes = {}
    for best_step in (2, 3):  # the state is at step 3
        path = str(tmp_path / f"best_at_{best_step}.pt")
        state = new_state(path, total_steps=9, step=3, best_val=1.5)
        state.best = model_checkpoint(model, "student", val_loss=1.5, step=best_step, preset="tiny")
        train_state.save(state, procs, model, optimizer, scaler)
        sizes[best_step] = os.path.getsize(path)
        fresh, fresh_opt, _ = parts(seed=1)
        back = loaded(path, procs, fresh, fresh_opt, scaler)
        assert back.best["step"] == best_step and back.best["val_loss"] == 1.5
        assert back.best["model"].keys() == state.best["model"].keys()
        assert all(torch.equal(back.best["model"][k], v) for k, v in state.best["model"].items())
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert sizes[2] - sizes[3] >= 0.9 * weights


def test_a_changed_flag_is_refused_naming_it_and_its_saved_value(tmp_path):
    path, _, _ = saved_state(tmp_path)
    procs = Processes(ddp=False, rank=0, world=1, device="cpu")
    with pytest.raises(LessonError) as e:
        loaded(path, procs, *parts(), {**SETTINGS, "lr": 0.001})
    assert "other settings (lr: it had --lr 0.01)" in str(e.value)
    two = Processes(ddp=False, rank=0, world=2, device="cpu")
    with pytest.raises(LessonError, match=r"other settings \(process count\)"):
        loaded(path, two, *parts())
    with pytest.raises(LessonError, match="for a different student than init.pt"):
        loaded(path, procs, *parts(), {**SETTINGS, "init": "init.pt"}, {"n_layer": 2})


def test_settings_of_leave_out_the_flags_that_may_change_on_resume():
    flags = dict(out="a", preset="tiny", resume=True, log_interval=1, stop_after=3, lr=0.01, kd="seq", dtype="auto")
    assert train_state.settings_of(flags, "fp32") == {"lr": 0.01, "kd": "seq", "dtype": "fp32"}  # auto, resolved
    assert train_state.settings_of(flags, "bf16")["dtype"] == "bf16"  # so a resume on another GPU is checked


def test_an_unfinished_state_is_kept_as_prev_and_a_finished_one_is_not(tmp_path):
    path, _, _ = saved_state(tmp_path, step=3, total_steps=10)
    unfinished = open(path, "rb").read()
    assert train_state.keep_unfinished(path)
    assert not os.path.exists(path)
    assert (tmp_path / "train_state.prev.pt").read_bytes() == unfinished
    path, _, _ = saved_state(tmp_path, step=10, total_steps=10)
    assert not train_state.keep_unfinished(path) and os.path.exists(path)
    assert (tmp_path / "train_state.prev.pt").read_bytes() == unfinished  # left alone
    os.remove(path)
    assert not train_state.keep_unfinished(path)
    # a state that cannot be read (cut short by a crash while saving) might be unfinished: kept too
    (tmp_path / "train_state.pt").write_bytes(b"not a checkpoint")
    assert train_state.keep_unfinished(path) and not os.path.exists(path)
    assert (tmp_path / "train_state.prev.pt").read_bytes() == b"not a checkpoint"


def test_only_rank_0_keeps_an_unfinished_state_aside(tmp_path, capsys):
    """A fresh run of 2 processes beside an unfinished train_state.pt: rank 1 leaves it alone (one
    rename, by rank 0, which says so; two ranks renaming would race)."""
    path, _, _ = saved_state(tmp_path, step=3, total_steps=10)
    for rank in (1, 0):
        procs = Processes(ddp=True, rank=rank, world=2, device="cpu")
        train_state.start(new_state(path), False, procs, *parts())
        assert os.path.exists(path) == (rank == 1) and (tmp_path / "train_state.prev.pt").exists() == (rank == 0)
    assert capsys.readouterr().out.count("is kept as train_state.prev.pt") == 1


def test_each_rank_gets_its_own_random_stream_back(tmp_path):
    """Two ranks' states saved in rank order: rank 1 resumes rank 1's stream, not rank 0's."""
    streams = []
    for seed in (10, 11):
        torch.manual_seed(seed)
        streams.append({"cpu": torch.get_rng_state(), "cuda": None})
    expected = [torch.Generator().manual_seed(s) for s in (10, 11)]
    path, _, _ = saved_state(tmp_path, rng=streams)
    for rank in (1, 0):
        procs = Processes(ddp=False, rank=rank, world=1, device="cpu")  # world 1: as saved
        loaded(path, procs, *parts())
        assert torch.equal(torch.rand(5), torch.rand(5, generator=expected[rank]))


def test_failures_are_explained_in_one_line():
    state = new_state("s.pt", step=7)
    with pytest.raises(LessonError, match="loss became nan at step 8: stopped without saving"):
        with train_state.failures_explained(state, 8, 1):
            raise FloatingPointError("loss became nan at step 8")
    with pytest.raises(LessonError, match="at step 7 \\(batch 8\\): try --batch-size 4 "
                                          "--grad-accum 2 \\(same effective batch\\)"):
        with train_state.failures_explained(state, 8, 1):
            raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(LessonError, match="stopped at once at step 7; s.pt holds"):
        with train_state.failures_explained(state, 8, 1):
            raise KeyboardInterrupt


def test_ctrl_c_once_asks_the_step_to_finish_twice_stops_at_once():
    said = []
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_finishes_the_step(lambda: said.append(1)) as stop:
            assert not stop.requested
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested and said == [1]  # the loop goes on to the end of its step
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("a second Ctrl-C must stop at once")
    assert signal.getsignal(signal.SIGINT) is before  # the usual Ctrl-C is back


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(rank, port, results):
    """One of two CPU processes, started the way torchrun starts them (RANK etc. set)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    procs = distributed.start()
    torch.manual_seed(100 + rank)
    states = distributed.gather_rng_states(procs)
    sums = distributed.all_sum(procs, [rank + 1, 0.5 * rank])
    results.put((procs.rank, procs.world, procs.ddp, sums, [torch.rand(2, generator=torch.Generator()
                 .set_state(s["cpu"])).tolist() for s in states]))
    distributed.end(procs)


def test_two_processes_sum_and_gather_their_random_states_in_rank_order():
    ctx = torch.multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    workers = [ctx.Process(target=two_ranks, args=(r, port, results)) for r in (0, 1)]
    for w in workers:
        w.start()
    got = sorted(results.get(timeout=180) for _ in workers)
    for w in workers:
        w.join(timeout=60)
    first = [torch.rand(2, generator=torch.Generator().manual_seed(100 + r)).tolist() for r in (0, 1)]
    for rank, (r, world, ddp, sums, streams) in enumerate(got):
        assert (r, world, ddp) == (rank, 2, True)
        assert sums == [3.0, 0.5]          # 1 + 2, 0 + 0.5
        assert streams == first            # rank 0's state first, then rank 1's


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def test_all_sum_keeps_every_token_count_exact():
    """Token counts pass through all_sum: in float32 a count above 2^24 would lose its last units."""
    procs = Processes(ddp=False, rank=0, world=1, device="cpu")
    assert distributed.all_sum(procs, [2**24 + 1, 2**40 + 3, 0.5]) == [2**24 + 1, 2**40 + 3, 0.5]


def test_the_log_lines_eta_is_the_time_per_step_times_the_steps_left(monkeypatch):
    from common.plumbing import progress
    monkeypatch.setattr(progress.time, "time", lambda: 130.0)  # the line at 130 s
    speed = progress.Speedometer(started=100.0, last=100.0)
    state = new_state("s.pt", step=10)
    state.history.update(loss=[2.0], ce=[2.0], lr=[1e-3], grad_norm=[1.0])
    line = speed.line(state, 40, 0, 10, 0)  # 10 steps in 30 s, 30 steps left: 90 s
    assert line.endswith("| eta 1m30s"), line


def test_the_best_is_kept_only_when_strictly_lower_never_at_a_tie_or_a_nan(tmp_path):
    """keep_if_best at its edges: a val loss equal to the best is not a new best (the earlier
    weights stay), nor is a NaN (it compares as nothing); a lower one is."""
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=1, n_embd=8))
    state = new_state(tmp_path / "s.pt")
    assert state.keep_if_best(2.0, model, "tiny") and state.best_val == 2.0
    first = state.best
    assert not state.keep_if_best(2.0, model, "tiny") and state.best is first
    assert not state.keep_if_best(float("nan"), model, "tiny") and state.best is first
    assert state.keep_if_best(1.5, model, "tiny") and state.best_val == 1.5


def test_the_last_line_and_files_of_a_run_whose_best_epoch_was_not_its_last(tmp_path, capsys):
    """Val loss 2.0 then 2.3: student.pt is the best epoch's, student_last.pt the last weights with the
    last val loss, and the final line gives the best loss with its own perplexity (fails with the last
    validation's perplexity printed beside the best loss)."""
    import math

    from common.plumbing.artifacts import model_checkpoint
    model, _, _ = parts()
    state = new_state(tmp_path / "train_state.pt", step=6, best_val=2.0)
    state.best = model_checkpoint(model, "student", val_loss=2.0, step=3, preset="tiny")
    state.history.update(val=[(0, 2.9), (3, 2.0), (6, 2.3)], tokens=1200)
    procs = Processes(ddp=False, rank=0, world=1, device="cpu")
    train_state.save_results(state, procs, model, str(tmp_path), {"preset": "tiny"})
    said = capsys.readouterr().out
    assert f"| 1,200 tokens seen | best val loss 2.0000 (ppl {math.exp(2.0):.1f}) | wrote {tmp_path}/student.pt" in said
    best, last = (torch.load(tmp_path / f, weights_only=True) for f in ("student.pt", "student_last.pt"))
    assert (best["val_loss"], best["step"]) == (2.0, 3) and (last["val_loss"], last["step"]) == (2.3, 6)
    log = torch.load(tmp_path / "train_log.pt", weights_only=True)
    assert log["best_val"] == 2.0 and log["val"][-1] == (6, 2.3) and log["preset"] == "tiny"
