"""Where values travel: each flag's non-default value reaches the object that uses it (two flags with
equal defaults swapped pass every test run at the defaults), each step reads the data it should."""
import sys

import pytest

from common.distill import FLAGS, KD
from conftest import load_lesson

L04 = load_lesson("04_train.py")

# a value for each of KD's flags, each unlike its default and unlike the others
NON_DEFAULT = {"--kd": "jsd", "--kd-alpha": "0.3", "--kd-temperature": "1.5", "--jsd-beta": "0.7",
               "--soft-tail": "rest", "--soft-k": "5", "--skew": "0.2", "--entropy-threshold": "2.5"}


def test_each_distillation_flag_reaches_its_field_of_kd(monkeypatch):
    """04's flags at values unlike their defaults and unlike each other: KD.from_args (04) and
    KD.from_flags (07's method lists) put each in its own field (fails with --kd-alpha and --jsd-beta
    swapped, equal at their defaults of 0.5, or a flag left at its default)."""
    assert set(NON_DEFAULT) == set(FLAGS)  # a new flag needs a value here
    flags = [x for pair in NON_DEFAULT.items() for x in pair]
    monkeypatch.setattr(sys, "argv", ["04_train.py", "--preset", "tiny", *flags])
    monkeypatch.setattr(L04, "refuse_misfits", lambda args: None)  # these values do not fit together
    for kd in (KD.from_args(L04.get_args()), KD.from_flags(flags)):
        for flag, field in FLAGS.items():
            default = getattr(KD(), field)
            assert getattr(kd, field) == type(default)(NON_DEFAULT[flag]) != default, flag


def test_loss_sums_hands_each_kinds_own_parameter_to_its_divergence():
    """jsd takes kd.beta, skl kd.skew, eopd kd.entropy: the loss the loop trains on is the divergence
    at that kind's own parameter (fails with beta and skew swapped)."""
    import torch

    from common.distill import loss_sums, token_divergence
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)
    y = torch.tensor([[1, 2, -100], [3, -100, -100]])
    kd = KD("jsd", beta=0.3, skew=0.2, entropy=5.0)  # above every position's entropy (ln 11): no forward KL
    for kind, own in (("jsd", dict(beta=0.3)), ("skl", dict(skew=0.2)), ("eopd", dict(entropy=5.0))):
        loss = loss_sums(logits, y, KD(**{**kd.__dict__, "kind": kind}), teacher_logits=teacher)[0]
        want = token_divergence(logits, teacher, kind, **own)[y != -100].sum()
        assert loss.item() == pytest.approx(want.item(), rel=1e-5), kind


def test_04s_training_flags_reach_the_step_the_schedule_and_the_students_sampling(start_copy, monkeypatch):
    """One epoch of 04 at non-default --grad-clip, --min-lr-ratio, --warmup and --on-policy-temperature:
    clip_grad_norm_ gets that norm at every step, the student samples at that temperature, and the logged
    learning rates follow lr_at with that floor and warmup (fails with any of them left at its default,
    whose value the other tests run at)."""
    import torch

    import common.sampling
    from common.plumbing.artifacts import load_artifact
    from conftest import run_here
    seen = {"max_norm": set(), "temperature": set()}
    clip, sample = torch.nn.utils.clip_grad_norm_, common.sampling.continue_each

    def clip_and_see(params, max_norm, *a, **k):
        seen["max_norm"].add(max_norm)
        return clip(params, max_norm, *a, **k)

    def sample_and_see(model, prompts, n_new, eos, temperature, *a, **k):
        seen["temperature"].add(temperature)
        return sample(model, prompts, n_new, eos, temperature, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_see)
    monkeypatch.setattr(common.sampling, "continue_each", sample_and_see)
    r = run_here(["04_train.py", "--preset", "tiny", "--out", str(start_copy), "--epochs", "1", "--kd", "rkl",
                  "--on-policy", "0.5", "--on-policy-temperature", "0.7", "--grad-clip", "0.25",
                  "--min-lr-ratio", "0.3", "--warmup-steps", "3", "--log-interval", "1"])
    assert r.returncode == 0, r.stderr
    assert seen == {"max_norm": {0.25}, "temperature": {0.7}}
    log = load_artifact(str(start_copy / "train_log.pt"), "train_log")
    lr, total = log["settings"]["lr"], log["steps_per_epoch"]  # one epoch
    want = [L04.lr_at(step - 1, total, 3, lr, lr * 0.3) for step in log["step"]]
    assert log["lr"] == [pytest.approx(x, rel=1e-6) for x in want]
    assert log["lr"][2] == pytest.approx(lr) and log["lr"][-1] == pytest.approx(lr * 0.3, rel=0.01)


# --- index maps from the teacher's parts onto the student's, where they are not the identity ---
def gpt(n_layer, seed=0, n_head=4, n_embd=32):
    import torch

    from common.model import GPT, GPTConfig
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    for p in model.parameters():  # every weight distinct, LayerNorms included
        p.data.normal_(0, 0.5)
    return model


def test_every_other_block_takes_the_teachers_blocks_0_2_4_in_order():
    """A 6-block teacher: the student's block i is the teacher's block 2i, the rest shared (fails with the
    odd blocks taken, or block i // 2 read for every i). Any depth: half, rounded down, at least one."""
    import torch
    L03 = load_lesson("03_student.py")
    teacher = gpt(6)
    student = L03.every_other_block(teacher).state_dict()
    theirs = teacher.state_dict()
    assert student.keys() <= theirs.keys() and "transformer.h.2.attn.c_attn.weight" in student
    for name, value in student.items():
        if name.startswith("transformer.h."):
            _, _, i, rest = name.split(".", 3)
            name = f"transformer.h.{2 * int(i)}.{rest}"
        assert torch.equal(value, theirs[name]), name
    for depth, kept in ((1, 1), (2, 1), (3, 1), (5, 2), (12, 6)):  # half the depth, rounded down; at least one
        assert L03.every_other_block(gpt(depth)).config.n_layer == kept, depth


def test_pruned_reads_each_kept_block_by_its_number_in_the_teacher():
    """A 3-block teacher whose scores keep blocks 1 and 2 (not the identity 0, 1), with heads and neurons
    scored differently in every block: 03's pruned is cut() of exactly those units, each block's heads and
    neurons read by the teacher's block number, every list in the teacher's order (fails with the scores
    read by the student's layer number, or the units kept in score order)."""
    import torch

    from common.prune import cut
    L03 = load_lesson("03_student.py")
    teacher = gpt(3)
    g = torch.Generator().manual_seed(0)
    heads_scored = torch.tensor([[9.0, 8, 0, 0], [0, 9, 8, 0], [0, 0, 8, 9]])  # keeps 0 1 | 1 2 | 2 3
    score = {"blocks": torch.tensor([0.1, 3.0, 2.0]), "heads": heads_scored,
             "neurons": torch.rand(3, 128, generator=g), "channels": torch.rand(32, generator=g)}

    def top(s, k):  # by hand: the k highest, in the teacher's order
        return sorted(s.topk(k).indices.tolist())
    heads = [top(score["heads"][i], 2) for i in (1, 2)]
    assert heads == [[1, 2], [2, 3]]
    want = cut(teacher, [1, 2], heads, [top(score["neurons"][i], 64) for i in (1, 2)],
               top(score["channels"], 16)).state_dict()
    got = L03.pruned(teacher, score, (2, 2, 16)).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # and cut itself: the student's block j holds the teacher's block [1, 2][j], at the kept units
    theirs, c = teacher.state_dict(), top(score["channels"], 16)
    for j, old in enumerate((1, 2)):
        n = top(score["neurons"][old], 64)
        assert torch.equal(got[f"transformer.h.{j}.ln_1.weight"], theirs[f"transformer.h.{old}.ln_1.weight"][c])
        assert torch.equal(got[f"transformer.h.{j}.mlp.c_fc.bias"], theirs[f"transformer.h.{old}.mlp.c_fc.bias"][n])


def test_03s_kept_line_names_the_blocks_it_kept_in_the_teachers_order(tmp_path, monkeypatch, capsys):
    """03 --prune on a 3-block teacher whose block scores keep 2 and 1 (in score order): the kept
    line says [1, 2], the blocks the student holds in its order (fails with the score order printed)."""
    import argparse

    import torch
    L03 = load_lesson("03_student.py")
    teacher, g = gpt(3), torch.Generator().manual_seed(0)
    score = {"blocks": torch.tensor([0.1, 2.0, 3.0]), "heads": torch.rand(3, 4, generator=g),
             "neurons": torch.rand(3, 128, generator=g), "channels": torch.rand(32, generator=g)}
    monkeypatch.setattr(L03, "importance", lambda *a: score)
    texts = [torch.randint(0, 64, (12,), generator=g) for _ in range(8)]
    torch.save({"kind": "generated", "train": texts, "val": texts, "val_prompt_lens": [4] * 8},
               tmp_path / "generated.pt")
    args = argparse.Namespace(out=str(tmp_path), n_layer=2, n_head=2, n_embd=16, seed=0)
    student = L03.prune(teacher, args)
    assert "  kept: blocks [1, 2] of 3, 2 heads of 4 and 64 MLP neurons of 128 in each, 16 channels of 32\n" \
        in capsys.readouterr().out
    assert torch.equal(student.transformer.h[0].ln_1.bias, teacher.transformer.h[1].ln_1.bias[
        score["channels"].topk(16).indices.sort().values])


def test_06s_training_chart_draws_each_line_from_the_numbers_its_label_names(monkeypatch):
    """Under --kd soft the log's loss holds the KL term too: the train line is the cross-entropy part,
    the val line the val losses, the flat line the teacher's, the dotted one the schedule; the y range
    takes the cross-entropy, not the loss (fails with log["loss"] drawn)."""
    L06 = load_lesson("06_compare.py")
    drawn = {}

    def keep(fig, path):  # instead of saving: the lines drawn, by label
        drawn.update({line.get_label(): line for ax in fig.axes for line in ax.get_lines()})
        L06.plt.close(fig)
    monkeypatch.setattr(L06, "save_chart", keep)
    log = {"step": [1, 2, 3, 4], "loss": [9.0, 8.0, 7.0, 6.0], "ce": [5.0, 4.0, 3.0, 2.5],
           "lr": [1e-4, 2e-4, 1.5e-4, 1e-4], "val": [(2, 3.5), (4, 2.8)], "settings": {"kd": "soft"}}
    L06.training_chart(log, 2.0, "unused.png")
    data = {label.split(" (")[0]: list(line.get_ydata()) for label, line in drawn.items()}
    assert data == {"train cross-entropy": log["ce"], "val cross-entropy": [3.5, 2.8],
                    "teacher on the same val samples": [2.0, 2.0], "learning rate": log["lr"]}
    assert list(drawn["val cross-entropy (per epoch)"].get_xdata()) == [2, 4]
    assert drawn["train cross-entropy (per step)"].axes.get_ylim() == pytest.approx((1.8, 5.5))


# --- the toy language's own grammar ---
def test_every_choice_of_the_toy_grammar_is_a_distribution_and_its_stories_keep_their_rules():
    """500 stories written through a recorder: every choice's probabilities are positive and sum to 1
    (log_prob and the floor rely on it); a character goes somewhere with someone else; a count lists
    one, two, ... and says its total; the 40 openings are distinct (fails with the adjectives' half
    given weight 1 each, a sentence-count table that sums to 0.9, a character going with itself)."""
    import random
    import re

    from common import toy_language as toy

    class Recorder:
        def __init__(self, rng):
            self.rng, self.text = rng, ""

        def choose(self, pairs):
            probs = [p for _, p in pairs]
            assert min(probs) > 0 and abs(sum(probs) - 1) < 1e-9, pairs
            return self.rng.choices([o for o, _ in pairs], probs)[0]

        def emit(self, text):
            self.text += text
    rng = random.Random(0)
    for _ in range(500):
        w = Recorder(rng)
        toy._document(w)
        name = re.match(r"(\w+) was|Once there was .* called (\w+)\.", w.text).group(1, 2)
        name = name[0] or name[1]
        for companion in re.findall(r"went to the \w+ with (\w+)\.", w.text):
            assert companion != name, w.text
        for listed, total in re.findall(r"counted the \w+: ([a-z, ]+)\. There were (\w+)", w.text):
            words = listed.split(", ")
            assert words == toy.NUMBERS[:len(words)] and total == words[-1], w.text
    assert len(set(toy.OPENINGS)) == len(toy.OPENINGS) == 40


# --- which data each step reads ---
def test_02_keeps_the_closing_end_of_text_and_cuts_what_follows_it(monkeypatch):
    """generate_samples on rows the model 'wrote' (generate replaced): a sample that ends keeps its
    <|endoftext|> (the student must learn to stop) and loses what came after; one that never ends keeps
    all its max_new_tokens (fails with the ending token dropped)."""
    import torch

    from common.tokenizer import EOT
    L02 = load_lesson("02_generate.py")
    rows = torch.tensor([[EOT, 5, 6, 7, EOT, 9, 9], [EOT, 5, 6, 7, 8, 9, 10]])
    monkeypatch.setattr(L02, "generate", lambda model, idx, n, **k: rows[:len(idx)])
    args = type("Args", (), dict(batch_size=2, max_new_tokens=4, temperature=1.0, top_k=50, top_p=1.0, seed=0))
    samples, _ = L02.generate_samples(None, [[EOT, 5, 6], [EOT, 5, 6]], args, "cpu")
    assert [s.tolist() for s, _, _ in samples] == [[EOT, 5, 6, 7, EOT], [EOT, 5, 6, 7, 8, 9, 10]]


def test_02_crops_each_row_at_its_own_budget_and_returns_the_samples_in_plan_order(monkeypatch):
    """Prompts of 4, 2 and 3 tokens, two to a batch (the shortest first: [1, 2], then [0]); the model
    never ends, writing 30 + the row's number past every prompt: each sample is its own prompt and
    max_new_tokens, not cut at the batch's longest prompt, and the list is in the prompts' order, each
    with its own prompt length and number."""
    import torch
    L02 = load_lesson("02_generate.py")

    def generate(model, idx, n, prompt_lens, **k):
        out = torch.cat([idx, torch.zeros(len(idx), n, dtype=torch.long)], 1)
        for j, P in enumerate(prompt_lens):  # each row's own text after its own prompt
            out[j, P:] = 30 + out[j, 0]
        return out
    monkeypatch.setattr(L02, "generate", generate)
    args = type("Args", (), dict(batch_size=2, max_new_tokens=3, temperature=1.0, top_k=50, top_p=1.0, seed=0))
    prompts = [[0, 1, 1, 1], [1, 1], [2, 1, 1]]
    samples, _ = L02.generate_samples(None, prompts, args, "cpu")
    assert [(s.tolist(), P, n) for s, P, n in samples] == [(p + [30 + n] * 3, len(p), n) for n, p in enumerate(prompts)]


def test_04s_val_loss_scores_the_val_texts_after_their_own_prompts():
    """val_loss against the NLL of each val text's sampled tokens by hand, with train and val prompts of
    other lengths (fails with the train split's prompt lengths, or a prompt token scored)."""
    import torch

    from common.plumbing.device import Precision
    model = gpt(2)
    g = torch.Generator().manual_seed(0)
    val = [torch.randint(0, 64, (n,), generator=g) for n in (9, 12, 7)]
    data = {"val": val, "val_prompt_lens": [2, 5, 3], "train_prompt_lens": [6, 1, 1]}
    nll, n = 0.0, 0
    with torch.no_grad():
        for s, P in zip(val, data["val_prompt_lens"]):
            logp = torch.log_softmax(model(s[None, :-1])[0][0], -1)
            nll -= logp[torch.arange(P - 1, len(s) - 1), s[P:]].sum().item()  # tokens P.. predicted
            n += len(s) - P
    assert L04.val_loss(model, data, 2, Precision("cpu", "fp32")) == pytest.approx(nll / n, rel=1e-5)


def test_the_held_out_toy_documents_are_not_the_ones_the_teacher_trained_on(monkeypatch, tmp_path):
    """01 trains the tiny teacher on a seed of its own; 01's, 05's and 09's held-out documents come from
    other seeds (fails with the teacher trained on a held-out seed's stream)."""
    from common import toy_language
    from conftest import run_here
    seen = {}

    def record(model, steps, encode, eot, seed=1, **k):
        seen["seed"] = seed
        raise KeyboardInterrupt  # enough: the seed is known
    monkeypatch.setattr(toy_language, "train_on_toy_language", record)
    run_here(["01_teacher.py", "--preset", "tiny", "--out", str(tmp_path)])
    held_out = {load_lesson("01_teacher.py").TOY_HELD_OUT_SEED, load_lesson("05_evaluate.py").TOY_SEED,
                load_lesson("09_starts.py").TOY_SEED, load_lesson("10_bytes.py").TOY_SEED}
    assert "seed" in seen and seen["seed"] not in held_out and len(held_out) >= 2


def spy(monkeypatch, module, name, calls, stop=False):
    """Replace module.name by a wrapper that records each call's (args, kwargs) in calls, then calls
    the real one (or, stop=True, interrupts the lesson: enough has been seen)."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        if stop:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)


def test_05_scores_each_toy_document_whole(course_copy, monkeypatch):
    """Each toy-language document 05 scores starts and ends with <|endoftext|> and has no other: read
    after one, as the teacher was trained, and its ending a token to predict (fails with the closing
    token dropped). Scored as sequences from their first token (prompt length 1)."""
    import common.perplexity
    from common.tokenizer import EOT
    from conftest import run_here
    calls = []
    spy(monkeypatch, common.perplexity, "sequences_nll", calls)
    r = run_here(["05_evaluate.py", "--preset", "tiny", "--out", str(course_copy)])
    assert r.returncode == 0, r.stderr
    toy = [(args[1], k["prompt_lens"]) for args, k in calls if len(args[1]) == 60]
    assert toy and all(P == [1] * 60 for _, P in toy)
    assert all(d[0] == EOT and d[-1] == EOT and (d[1:-1] != EOT).all() for d in toy[0][0])


def test_03_calibrates_pruning_on_the_train_split(start_copy, monkeypatch):
    """03 --prune scores the teacher's units on texts of 02's train split only (its first batches), and
    checks the kept units on val texts (the second), never on test."""
    import torch

    import common.data
    from conftest import run_here
    calls = []
    spy(monkeypatch, common.data, "batches", calls)
    r = run_here(["03_student.py", "--preset", "tiny", "--out", str(start_copy), "--prune"])
    assert r.returncode == 0, r.stderr
    data = torch.load(start_copy / "generated.pt", weights_only=False)
    key = {split: {tuple(s.tolist()) for s in data[split]} for split in ("train", "val", "test")}
    calibration, check = ({tuple(s.tolist()) for s in args[0]} for args, _ in calls)
    assert calibration and calibration <= key["train"] and not calibration & (key["val"] | key["test"])
    assert check and check <= key["val"]


def test_09_hands_its_shape_to_03(start_copy, monkeypatch):
    """09 --n-layer 2 makes each start with 03 --n-layer 2 (not the preset's 1)."""
    import common.plumbing.runs
    from conftest import run_here
    calls = []
    spy(monkeypatch, common.plumbing.runs, "run_or_refuse", calls, stop=True)
    run_here(["09_starts.py", "--preset", "tiny", "--out", str(start_copy), "--n-layer", "2"])
    script, flags, _ = calls[0][0]
    assert script == "03_student.py" and flags[flags.index("--n-layer") + 1] == "2"


# --- rules at their edges ---
def test_out_of_memory_advice_keeps_the_effective_batch_at_any_setting():
    """At batch 6 and --grad-accum 3 (not the defaults): halve the batch, double the accumulation."""
    import torch

    from common.plumbing import train_state
    from common.plumbing.errors import LessonError
    state = type("State", (), {"step": 2, "path": "s.pt"})()
    with pytest.raises(LessonError, match="try --batch-size 3 --grad-accum 6 \\(same effective batch\\)"):
        with train_state.failures_explained(state, 6, 3):
            raise torch.OutOfMemoryError("CUDA out of memory")


def test_only_where_files_go_and_how_often_to_log_may_change_on_resume(monkeypatch):
    """Every flag of 04 but --out, --preset (its values are the other flags), --resume, --log-interval
    and --stop-after is part of what a run trains: changed on --resume, it is refused (fails with --seed,
    or any other flag, let through)."""
    from common.plumbing import train_state
    monkeypatch.setattr(sys, "argv", ["04_train.py", "--preset", "tiny"])
    args = vars(L04.get_args())
    free = {"out", "preset", "resume", "log_interval", "stop_after"}
    kept = train_state.settings_of(args, "fp32")
    assert set(kept) == set(args) - free | {"dtype"}
    for flag in set(args) - free - {"dtype"}:  # (--dtype is kept as the precision it resolved to)
        other = dict(args, **{flag: "changed"})
        assert train_state.changed_settings(kept, train_state.settings_of(other, "fp32"), 1, 1) == [flag]


def test_an_accumulation_that_does_not_divide_the_micro_batches_trains_on_every_one(start_copy):
    """--grad-accum 3 over 52 micro-batches an epoch: 18 steps, the last of one micro-batch, and every
    training text seen once (fails with the steps floored, which drops the remainder)."""
    import torch

    from common.plumbing.artifacts import load_artifact
    from conftest import run_here
    r = run_here(["04_train.py", "--preset", "tiny", "--out", str(start_copy), "--epochs", "1",
                  "--grad-accum", "3"])
    assert r.returncode == 0, r.stderr
    log = load_artifact(str(start_copy / "train_log.pt"), "train_log")
    data = torch.load(start_copy / "generated.pt", weights_only=False)
    assert len(data["train"]) == 205 and log["steps_per_epoch"] == 18 and log["step"][-1] == 18
    assert log["tokens"] == sum(len(s) - P for s, P in zip(data["train"], data["train_prompt_lens"]))


# --- numbers a report prints beside a measurement ---
def test_06s_gap_closed_is_the_share_of_the_log_perplexity_gap():
    """Untrained student e^3, trained e^1, teacher e^0.5: (3 - 1) / (3 - 0.5) = 0.8 of the way."""
    import math
    L06 = load_lesson("06_compare.py")
    r = {"student_init": math.exp(3), "student": math.exp(1), "teacher": math.exp(0.5)}
    assert L06.gap_closed(r) == pytest.approx(0.8)


# --- where the notebook's settings land ---
def test_a_notebooks_args_are_split_as_a_shell_splits_them(monkeypatch):
    """ARGS = '--prompts-file "my openings.txt" --kd soft': a quoted file name stays one argument, as on
    the command line (fails with a plain split on spaces)."""
    import IPython

    from common.plumbing import cli
    shell = type("Shell", (), {"user_ns": {"ARGS": '--prompts-file "my openings.txt" --kd soft'}})()
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    assert cli.notebook_args() == ["--prompts-file", "my openings.txt", "--kd", "soft"]


def test_a_preset_fills_only_the_flags_left_unset_not_the_ones_set_to_zero(monkeypatch):
    """The tiny preset's values fill flags left unset (None); a flag set to 0 or False keeps it (fails
    with `if not value`, which would turn 02's --topk-logits 0 back into 32)."""
    import argparse

    from common.plumbing import cli
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--count", type=int)
    p.add_argument("--size", type=int)
    monkeypatch.setattr(sys, "argv", ["x.py", "--count", "0"])
    args = cli.parse(p, {"tiny": {"count": 7, "size": 9}})
    assert (args.count, args.size) == (0, 9)


def test_a_run_made_with_other_03_flags_is_trained_again_not_kept(tmp_path, monkeypatch):
    """runs.train (07, 09): a finished run is kept only under the same recipe, and 03's flags (how the
    student is made) are part of it: with --n-layer 2 instead of 1 both lessons run again (fails with
    03's flags left out of the recipe, which keeps the old student)."""
    import time

    import torch

    from common.plumbing import runs
    (tmp_path / "teacher.pt").write_bytes(b"t")
    ran = []

    def fake(script, flags, label):  # 04 "trains": writes its log
        ran.append(script)
        if script == "04_train.py":
            torch.save({"kind": "train_log"}, tmp_path / "sub" / "train_log.pt")
    monkeypatch.setattr(runs, "run_or_refuse", fake)
    monkeypatch.setattr(runs, "load_artifact", lambda path, kind: {"kind": kind})
    sub = str(tmp_path / "sub")
    for n_layer, want in (("1", ["03_student.py", "04_train.py"]), ("1", []), ("2", ["03_student.py", "04_train.py"])):
        ran.clear()
        time.sleep(0.01)  # the log is newer than the recipe it was made under
        runs.train("a start", sub, ["--epochs", "1"], str(tmp_path), None, False, ["teacher.pt"],
                   make=["--n-layer", n_layer])
        assert ran == want, (n_layer, ran)


# --- round 3's misses: a flag's default, a flag into its model, a count into each run, a seed ---
def test_04s_distillation_flags_left_unset_are_kds_defaults(monkeypatch):
    """04 run with no distillation flag trains with KD's own defaults, the values 07's method lists
    and --help assume (fails with a default taken from another field: --entropy-threshold's from
    KD.alpha passes every test that sets the flag)."""
    monkeypatch.setattr(sys, "argv", ["04_train.py", "--preset", "tiny"])
    assert KD.from_args(L04.get_args()) == KD()


def test_03s_shape_flags_and_init_std_reach_the_random_student(start_copy):
    """03's random student at non-default --n-layer, --n-embd, --n-head and --init-std: its config has
    each, and its weights are drawn with that std; at the tiny preset's defaults, 0.1 (fails with
    --init-std dropped: GPTConfig's own 0.02)."""
    import torch

    from common.plumbing.artifacts import load_artifact
    from conftest import run_here
    for flags, want in (([], dict(n_layer=2, n_embd=32, n_head=2, init_std=0.1)),
                        (["--n-layer", "1", "--n-embd", "48", "--n-head", "4", "--init-std", "0.05"],
                         dict(n_layer=1, n_embd=48, n_head=4, init_std=0.05))):
        r = run_here(["03_student.py", "--preset", "tiny", "--out", str(start_copy), *flags])
        assert r.returncode == 0, r.stderr
        init = load_artifact(str(start_copy / "student_init.pt"), "student_init")
        assert {k: init["config"][k] for k in want} == want
        std = init["model"]["transformer.wte.weight"].float().std().item()
        assert std == pytest.approx(want["init_std"], rel=0.02)  # 1.6M draws: 0.1% off at most
        assert torch.equal(init["model"]["transformer.h.0.ln_1.weight"], torch.ones(want["n_embd"]))


def test_07_trains_the_start_for_warm_epochs_and_each_method_for_epochs(start_copy, monkeypatch):
    """07 at --warm-epochs 2 --epochs 1 (unequal, unlike the tests that run it at 1 and 1): the start's
    run of 04 gets 2, each method's run 1 and the start as its --init."""
    import common.plumbing.runs
    from conftest import run_here
    calls = []

    def record(label, sub, flags, *rest):
        calls.append(flags)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the first method's run: enough
    monkeypatch.setattr(common.plumbing.runs, "train", record)
    run_here(["07_methods.py", "--preset", "tiny", "--out", str(start_copy), "--warm-epochs", "2",
              "--epochs", "1", "--methods", "fkl", "--seeds", "1"])
    start, method = calls
    at = lambda flags, flag: flags[flags.index(flag) + 1]
    assert at(start, "--epochs") == "2" and at(method, "--epochs") == "1"
    assert at(method, "--init") == at(start, "--out") + "/student_last.pt"


def test_01_checks_the_tiny_teacher_on_documents_it_never_trained_on(tmp_path, monkeypatch):
    """The held-out documents 01 scores its teacher on come from a seed other than the one its
    training stream came from (fails with the training seed's stream read as held out)."""
    from common import toy_language
    from conftest import run_here
    seeds = {"train": [], "held out": []}
    documents = toy_language.documents

    def no_training(model, steps, encode, eot, seed=1, **k):
        seeds["train"].append(seed)
        return 1

    def record(n, seed):
        seeds["held out"].append(seed)
        return documents(n, seed)
    monkeypatch.setattr(toy_language, "train_on_toy_language", no_training)
    monkeypatch.setattr(toy_language, "documents", record)
    r = run_here(["01_teacher.py", "--preset", "tiny", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    assert seeds["train"] and seeds["held out"] and not set(seeds["train"]) & set(seeds["held out"])


def test_a_continuation_keeps_the_end_of_text_it_sampled_and_stops_there():
    """continue_each with a model that always writes <|endoftext|> (its logit 100, the others 0):
    each prompt gets exactly that one token (the student's on-policy texts must keep their ending, or
    the student never learns to stop), a row asked for 0 new tokens gets none, and the rest of the
    batch's generated positions are cut."""
    import torch

    from common.model import GPT, GPTConfig
    from common.sampling import continue_each
    eos = 7
    model = GPT(GPTConfig(vocab_size=10, block_size=16, n_layer=1, n_head=2, n_embd=8))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.eye(8)[0] * 10)   # every hidden state: 10 e_0
        model.transformer.wte.weight[:, 0] = 0
        model.transformer.wte.weight[eos, 0] = 10                 # eos's logit 100, the others 0
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([5, 6])]
    out = continue_each(model, prompts, [5, 3, 0], eos, temperature=1.0,
                        generator=torch.Generator().manual_seed(0))
    assert [o.tolist() for o in out] == [[1, 2, 3, eos], [4, eos], [5, 6]]


def test_the_saved_students_carry_their_own_val_loss_and_step(start_copy):
    """student.pt (the best on val) and student_last.pt each carry the step they were saved at and
    their val loss, the number 06 and 08 print beside them: each equal to the log's entry for that
    step and, for the last, to its val loss recomputed here (fails with a step written as a loss)."""
    from common.plumbing.artifacts import load_artifact, load_model
    from common.plumbing.device import precision
    from conftest import run_here
    from test_train import keep_train_samples
    keep_train_samples(start_copy, 8, n_val=4)
    r = run_here(["04_train.py", "--preset", "tiny", "--out", str(start_copy), "--epochs", "3"])
    assert r.returncode == 0, r.stderr
    log = load_artifact(str(start_copy / "train_log.pt"), "train_log")
    best, last = (load_artifact(str(start_copy / f), "student") for f in ("student.pt", "student_last.pt"))
    measured = dict(log["val"][1:])  # step -> val loss, at each epoch's end
    assert last["step"] == log["step"][-1] and last["val_loss"] == measured[last["step"]]
    assert best["val_loss"] == min(measured.values()) == measured[best["step"]]
    model, _ = load_model(str(start_copy / "student_last.pt"), "student")
    data = load_artifact(str(start_copy / "generated.pt"), "generated")
    assert L04.val_loss(model, data, 4, precision("cpu")) == pytest.approx(last["val_loss"], rel=1e-5)


def test_a_torch_build_runs_on_a_gpu_by_the_rule_at_every_capability():
    """gpu_supported against the rule itself at every capability from 3.0 to 12.9: a cubin sm_XY runs
    on X.Y and later minors of major X only; PTX compute_XY on any capability at or above X.Y, whose
    minor may be lower than Y when its major is higher (compute_75 runs on 8.0: fails with the
    versions compared part by part)."""
    from common.plumbing.device import gpu_supported
    builds = [["sm_75"], ["sm_80", "sm_86"], ["compute_75"], ["sm_90a", "compute_90"], ["compute_86"],
              ["sm_50", "sm_75", "compute_75"], ["sm_120"]]
    for arch_list in builds:
        for cap in [(major, minor) for major in range(3, 13) for minor in range(10)]:
            def runs(arch):
                kind, version = arch.split("_")
                v = int(version.rstrip("af"))
                return (cap[0] == v // 10 and cap[1] >= v % 10) if kind == "sm" else cap >= divmod(v, 10)
            assert gpu_supported(cap, arch_list) == any(runs(a) for a in arch_list), (arch_list, cap)


def test_weight_decay_falls_on_the_matrices_only():
    """configure_optimizer: every matrix (embeddings and linear weights) decays, no bias and no
    LayerNorm gain does (decay would pull them toward 0 for no gain)."""
    from common.model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=8))
    opt = model.configure_optimizer(1e-3, 0.1, "cpu")
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert decay[id(p)] == (0.1 if p.dim() >= 2 else 0.0), name
    assert sum(1 for p in model.parameters() if p.dim() < 2) >= 6  # biases and gains are there


def test_the_toy_teachers_rate_warms_up_to_its_peak_and_ends_at_a_tenth(monkeypatch):
    """train_on_toy_language's schedule as the optimizer sees it: a linear warmup over 20 steps times
    a cosine that starts at the given rate (not above: a warmup to a peak 10% high fails) and ends
    at a tenth of it."""
    import torch

    from common import toy_language
    from common.model import GPT, GPTConfig
    from common.tokenizer import EOT, get_tokenizer
    seen, step = [], torch.optim.AdamW.step

    def record(opt, *a, **k):
        seen.append(opt.param_groups[0]["lr"])
        return step(opt, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=8))
    toy_language.train_on_toy_language(model, 60, get_tokenizer().encode, EOT, batch_size=2, lr=1e-2,
                                       log=lambda *a: None)
    cosine = [lr / 1e-2 / min(1.0, (s + 1) / 20) for s, lr in enumerate(seen)]  # warmup divided out
    assert len(seen) == 60 and cosine == sorted(cosine, reverse=True)
    assert cosine[0] == pytest.approx(1.0, rel=1e-9) and cosine[-1] == pytest.approx(0.1, rel=0.01)


def test_a_log_lines_speed_and_eta_are_per_step_since_the_last_line(monkeypatch):
    """Speedometer.line on a clock set by hand: the last line of a run that ends between intervals
    (step 25, interval 10) covers 5 steps, so 1 s since the line at step 20 is 200 ms a step
    (fails with the time divided by the interval); tokens per second over that second; the eta
    from this run's steps only (resumed at step 12)."""
    import types

    from common.plumbing import progress
    clock = iter([103.0, 104.0])  # the line at step 20, then now
    monkeypatch.setattr(progress.time, "time", lambda: next(clock))
    speed = progress.Speedometer(started=100.0, last=100.0)
    state = types.SimpleNamespace(step=20, history={"loss": [2.0], "ce": [1.0], "lr": [1e-3],
                                                    "grad_norm": [0.5]})
    speed.line(state, 40, 0, 10, 12)
    state.step, speed.tokens = 25, 5000
    text = speed.line(state, 40, 0, 10, 12)
    assert "| 200 ms |" in text and "| 5.0k tok/s |" in text
    assert f"eta {progress.fmt_time(4.0 / 13 * 15)}" in text  # 4 s for 13 steps, 15 to go


def test_08s_plain_speed_counts_each_texts_closing_end_of_text(monkeypatch):
    """plain_speed, with generate and the clock replaced: two prompts whose texts end after 2 and 4
    tokens, each with its <|endoftext|> (a token the teacher wrote, as speculative decoding counts
    it), the rest padding: 8 tokens in 2 s."""
    import torch

    from common.tokenizer import EOT
    L08 = load_lesson("08_speculative.py")
    written = {3: [5, 6, EOT, EOT, EOT, EOT], 2: [7, 8, 9, 10, EOT, EOT]}

    def fake_generate(model, idx, n, eos_token=None, **kw):
        return torch.tensor([idx[0].tolist() + written[idx.size(1)]])
    clock = iter([10.0, 12.0])
    monkeypatch.setattr(L08, "generate", fake_generate)
    monkeypatch.setattr(L08.time, "time", lambda: next(clock))
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([1, 2])]
    assert L08.plain_speed(None, prompts, 6, {}, "cpu") == pytest.approx((3 + 5) / 2.0)


def test_every_rank_gets_the_same_number_of_distinct_micro_batches():
    """chunks_of_epoch at every small size: each of the world ranks gets exactly micro_per_epoch
    micro-batches (a rank with one fewer would wait forever for the others' gradients), no sample
    twice, and only the last, incomplete round of batches left out (fails with micro_per_epoch
    rounding up)."""
    for n in range(1, 26):
        for batch_size in (1, 3, 4):
            for world in (1, 2, 3):
                per_rank = L04.chunks_of_epoch(n, batch_size, 0, 0, 0.0, world)
                m = L04.micro_per_epoch(n, batch_size, world)
                if -(-n // batch_size) < world:  # fewer batches than ranks: not a case 04 runs
                    continue
                assert [len(chunks) for chunks in per_rank] == [m] * world, (n, batch_size, world)
                seen = [k for chunks in per_rank for idx, _ in chunks for k in idx]
                assert len(seen) == len(set(seen)) and len(seen) > n - batch_size * world


def test_08_draws_its_acceptances_on_the_cpu_wherever_the_models_are(monkeypatch):
    """08's runs draw from a generator on the CPU, whatever device the models are on (the draws, and
    so the table, are then the same on a GPU and a CPU): a teacher on another device (meta) is
    handed to run(), and the generator it makes is looked at."""
    import types

    import torch
    L08 = load_lesson("08_speculative.py")
    made = []

    class Seen(Exception):
        pass

    def generator(device="cpu"):
        made.append(str(device))
        raise Seen
    monkeypatch.setattr(L08.torch, "Generator", generator)
    teacher = types.SimpleNamespace(parameters=lambda: iter([torch.empty(1, device="meta")]))
    with pytest.raises(Seen):
        L08.run(teacher, teacher, [], 4, 2, {})
    assert made == ["cpu"]


def test_01s_plain_greedy_writes_what_02s_cached_generate_writes():
    """01's greedy (the whole text through the model at every step) and 02's generate at
    temperature 0 (a KV cache) continue a prompt with the same tokens, and only new ones (fails
    with the prompt's last token returned as the first one written)."""
    import torch

    from common.model import GPT, GPTConfig
    from common.sampling import generate
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, block_size=32, n_layer=2, n_head=2, n_embd=16, init_std=0.3))
    prompt = [3, 14, 15, 9, 2]
    plain = load_lesson("01_teacher.py").greedy(model.eval(), prompt, 12, eos=-1)
    cached = generate(model, torch.tensor([prompt]), 12, temperature=0)[0, len(prompt):].tolist()
    assert plain == cached and len(plain) == 12


def test_02_holds_out_each_share_of_openings_its_own_flag_asks_for():
    """split_by_opening at unequal --val-fraction 0.1 and --test-fraction 0.3 (the tests that run 02
    use equal ones): 2 of 20 openings go to val, 6 to test, each whole; the unconditional samples
    alike (1 and 3 of 10)."""
    import types
    L02 = load_lesson("02_generate.py")
    plan = [f"topic {i // 2}" for i in range(40)] + [None] * 10  # 20 openings x 2 samples, 10 alone
    kept = [(None, None, n) for n in range(len(plan))]
    args = types.SimpleNamespace(val_fraction=0.1, test_fraction=0.3, seed=0)
    splits = L02.split_by_opening(kept, plan, args)
    for name, openings, alone in (("val", 2, 1), ("test", 6, 3)):
        assert len({plan[j] for j in splits[name] if plan[j]}) == openings, name
        assert sum(1 for j in splits[name] if not plan[j]) == alone, name
    for name in ("val", "test"):
        assert not {plan[j] for j in splits[name] if plan[j]} & {plan[j] for j in splits["train"]}


def test_03s_printed_compression_is_the_ratio_of_the_saved_models(start_copy):
    """03 prints how many times fewer parameters the student has, in all and in its transformer
    blocks alone: both against the two checkpoints' own counts (fails with the blocks' ratio taken
    over the student's count with its embeddings)."""
    import re

    from common.plumbing.artifacts import load_model
    from conftest import run_here
    r = run_here(["03_student.py", "--preset", "tiny", "--out", str(start_copy)])
    assert r.returncode == 0, r.stderr
    teacher, _ = load_model(str(start_copy / "teacher.pt"), "teacher")
    student, _ = load_model(str(start_copy / "student_init.pt"), "student_init")
    ratio, body = map(float, re.search(r"compression: ([\d.]+)x fewer parameters \(([\d.]+)x in the "
                                       r"transformer blocks", r.stdout).groups())
    assert ratio == round(teacher.num_params() / student.num_params(), 1)
    assert body == round(teacher.num_params(embeddings=False) / student.num_params(embeddings=False), 1)


def test_04_at_warmup_steps_0_starts_at_the_peak_rate(start_copy):
    """--warmup-steps 0 is a value, not "unset": the first step trains at the peak rate (fails with 0
    read as falsy, the 10% default warmup taken instead)."""
    from common.plumbing.artifacts import load_artifact
    from conftest import run_here
    from test_train import keep_train_samples
    keep_train_samples(start_copy, 10, n_val=1)  # 20 steps of 1 text: the default warmup, 2 steps
    r = run_here(["04_train.py", "--preset", "tiny", "--out", str(start_copy), "--epochs", "2",
                  "--batch-size", "1", "--warmup-steps", "0", "--lr", "0.01"])
    assert r.returncode == 0, r.stderr
    log = load_artifact(str(start_copy / "train_log.pt"), "train_log")
    assert log["lr"][0] == pytest.approx(0.01) and log["lr"][1] < 0.01


def test_05_takes_a_stride_up_to_the_window_and_refuses_one_past_it(course_copy, monkeypatch):
    """--stride at its edge: equal to the teacher's window (128 tokens, the tiny preset), the
    default's own value, goes on to the evaluation sets (stopped there: enough); one more is refused
    in one line (fails with >= for >)."""
    import common.plumbing.artifacts
    from conftest import run_here
    load, reached = common.plumbing.artifacts.load_artifact, []

    def load_until_the_sets(path, kind, *a, **k):
        if kind == "generated":  # past the check: enough
            reached.append(path)
            raise KeyboardInterrupt
        return load(path, kind, *a, **k)
    monkeypatch.setattr(common.plumbing.artifacts, "load_artifact", load_until_the_sets)
    flags = ["05_evaluate.py", "--preset", "tiny", "--out", str(course_copy), "--stride"]
    r = run_here(flags + ["129"])
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--stride 129" in r.stderr
    assert not reached
    r = run_here(flags + ["128"])
    assert "--stride" not in r.stderr and reached, r.stderr


def test_06s_report_puts_each_model_at_its_own_multiple_of_the_floor(course):
    """report.md's toy-language sentence, written here by 06's perplexity_lines from the course's
    eval.pt and train_log.pt: the teacher's and the trained student's perplexities over the
    language's floor (fails with the untrained student's taken)."""
    import re

    from common.plumbing.artifacts import load_artifact
    out, _, _ = course
    ev = load_artifact(str(out / "eval.pt"), "eval")
    log = load_artifact(str(out / "train_log.pt"), "train_log")
    f, ppl = ev["floor"]["toy-language"], ev["perplexity"]["toy-language"]
    rates = {s: dict.fromkeys(("improvement", "achievement", "gap_closed"), 0.0) for s in ev["perplexity"]}
    lines = load_lesson("06_compare.py").perplexity_lines(ev, log, rates)
    text = " ".join(" ".join(lines).split())
    teacher, student = map(float, re.search(r"The teacher is at ([\d.]+)x the floor, the student at "
                                            r"([\d.]+)x\.", text).groups())
    assert teacher == round(ppl["teacher"] / f, 2) and student == round(ppl["student"] / f, 2)
    assert student != round(ppl["student_init"] / f, 2)


def test_08_takes_each_lab_methods_first_seed_as_its_draft(tmp_path):
    """draft_files reads methods.pt: of a method's runs (one folder a seed, the first seed first),
    the first, the one the lab's rate was chosen with (fails with the last seed's taken)."""
    from common.plumbing.artifacts import save_artifact
    L08 = load_lesson("08_speculative.py")
    folders = ["methods/fkl/lr0.01-seed1337", "methods/fkl/lr0.01-seed1338"]
    for folder in folders:
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "student_last.pt").write_bytes(b"")
    save_artifact({"kind": "methods", "rows": {"fkl": {"folders": folders}, "teacher": {}}},
                  str(tmp_path / "methods.pt"))
    files = L08.draft_files(str(tmp_path))
    assert files["07: fkl"] == f"{tmp_path}/{folders[0]}/student_last.pt" and "07: teacher" not in files


def test_08s_run_reports_its_numbers_by_their_formulas(monkeypatch):
    """run() with speculative_generate and the clock replaced by fixed ones: two prompts, 5
    proposals of known (kept, expected); the acceptance and its expectation are their means, the
    spread two standard errors of their difference (std / sqrt(n): fails with std / n), tokens per
    call and per second from the counts."""
    import math
    import types

    import torch
    L08 = load_lesson("08_speculative.py")
    trials = [[(1, 0.6), (0, 0.5), (1, 0.9)], [(1, 0.7), (0, 0.2)]]
    out = iter([(torch.arange(6), {"trials": trials[0], "target_calls": 3}),
                (torch.arange(4), {"trials": trials[1], "target_calls": 2})])
    monkeypatch.setattr(L08, "speculative_generate", lambda *a, **k: next(out))
    clock = iter([0.0, 2.0])
    monkeypatch.setattr(L08.time, "time", lambda: next(clock))
    model = types.SimpleNamespace(parameters=lambda: iter([torch.zeros(1)]))
    r = L08.run(model, model, [torch.tensor([1]), torch.tensor([2])], 8, 2, {})
    kept, expected = [1, 0, 1, 1, 0], [0.6, 0.5, 0.9, 0.7, 0.2]
    diff = [k - m for k, m in zip(kept, expected)]
    mean = sum(diff) / 5
    std = math.sqrt(sum((d - mean) ** 2 for d in diff) / 4)
    assert r["acceptance"] == pytest.approx(0.6) and r["expected"] == pytest.approx(2.9 / 5)
    assert r["diff_2se"] == pytest.approx(2 * std / math.sqrt(5))
    assert r["tokens_per_call"] == pytest.approx(10 / 5) and r["tok_s"] == pytest.approx(10 / 2.0)
    assert r["proposals"] == 5 and r["tokens"] == 10


def test_09_measures_each_start_after_training_on_04s_best_student(start_copy, runs_in_process, monkeypatch):
    """09's "after" is 04's student.pt (the best on val), not student_last.pt: the files it loads
    for each run, spied (fails with the last taken)."""
    import common.plumbing.artifacts
    from conftest import run_here
    from test_train import keep_train_samples
    keep_train_samples(start_copy, 8, n_val=2, n_test=2)
    calls = []
    spy(monkeypatch, common.plumbing.artifacts, "load_model", calls)
    r = run_here(["09_starts.py", "--preset", "tiny", "--out", str(start_copy), "--seeds", "1",
                  "--epochs", "1", "--starts", "random"])
    assert r.returncode == 0, r.stderr
    loaded = [args[0].rsplit("/", 1)[-1] for args, _ in calls]
    assert loaded[-2:] == ["student_init.pt", "student.pt"], loaded


def test_speculative_decoding_fills_the_context_exactly_and_refuses_one_more():
    """speculative_generate at its edge: a prompt and new tokens that fill the context exactly
    (block 16: 6 + 10) run (greedy: the target's own text, as 02's generate writes it); one more
    token is refused (fails with >= for >)."""
    import torch

    from common.model import GPT, GPTConfig
    from common.sampling import generate
    from common.speculative import speculative_generate
    torch.manual_seed(0)
    target = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=1, n_head=2, n_embd=16, init_std=0.3)).eval()
    draft = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=1, n_head=2, n_embd=8, init_std=0.3)).eval()
    prompt = torch.tensor([1, 2, 3, 4, 5, 6])
    new, _ = speculative_generate(target, draft, prompt, 10, 3, temperature=0)
    assert torch.equal(torch.as_tensor(new), generate(target, prompt[None], 10, temperature=0)[0, 6:])
    with pytest.raises(ValueError):
        speculative_generate(target, draft, prompt, 11, 3, temperature=0)


def test_each_timer_reports_what_its_runs_measured(monkeypatch):
    """The timers with generate and the clock replaced: 06's speed is the median of its 5 runs'
    rates (the warm-up untimed), 08's step time the median of its prompts' seconds per token, 08's
    interleaved timers run in turns after one warm-up each, and 02's speed is the new tokens, each
    text's closing <|endoftext|> in, over the whole generation's seconds (fails with the fastest run
    or the mean, a run's tokens miscounted, the warm-up timed)."""
    import types

    import torch

    from common.tokenizer import EOT
    L02, L06, L08 = (load_lesson(f) for f in ("02_generate.py", "06_compare.py", "08_speculative.py"))
    calls = []

    def fake_generate(model, idx, n, **kw):
        calls.append(n)
        return torch.cat([idx, torch.full((idx.size(0), n), 7)], 1)

    def clock(elapsed):  # each timed run's seconds, read as (start, end) pairs of the clock
        ticks = iter([t for e in elapsed for t in (100.0, 100.0 + e)])
        return lambda: next(ticks)
    monkeypatch.setattr(L06, "generate", fake_generate)
    monkeypatch.setattr(L06.time, "time", clock([1, 4, 2, 8, 3]))
    assert L06.tokens_per_second(None, "cpu", n_new=48, batch=2) == pytest.approx(96 / 3)
    assert calls == [4] + [48] * 5  # the warm-up, then the 5 timed runs
    monkeypatch.setattr(L08, "generate", fake_generate)
    monkeypatch.setattr(L08.time, "time", clock([30, 10, 20]))
    prompts = [torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([4, 5, 6])]
    assert L08.step_time(None, prompts, 10, "cpu") == pytest.approx(2.0)
    order, runs = [], {"a": iter([5, 1, 3, 9]), "b": iter([2, 8, 4, 6])}
    timers = {name: (lambda name=name: order.append(name) or next(runs[name])) for name in runs}
    assert L08.interleaved(timers, 3) == {"a": [1, 3, 9], "b": [4, 6, 8]}  # 5 and 2 were the warm-ups
    assert order == ["a", "b"] * 4 and L08.median([1, 3, 9]) == 3
    # 02: two prompts in one batch; the first text ends after 1 token and its <|endoftext|>
    monkeypatch.setattr(L02, "generate", lambda model, idx, n, **kw: torch.tensor(
        [[1, 2, 5, EOT, EOT, EOT, EOT], [1, 2, 3, 5, 6, 7, 8]]))
    ticks = iter([10.0])
    monkeypatch.setattr(L02.time, "time", lambda: next(ticks, 14.0))  # 4 s from the start on
    args = types.SimpleNamespace(batch_size=2, seed=0, max_new_tokens=4, temperature=1.0, top_k=None,
                                 top_p=None)
    samples, speed = L02.generate_samples(None, [[1, 2], [1, 2, 3]], args, "cpu")
    assert [s[0].tolist() for s in samples] == [[1, 2, 5, EOT], [1, 2, 3, 5, 6, 7, 8]]
    assert speed == pytest.approx((2 + 4) / 4.0)
