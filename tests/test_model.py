"""Our GPT loaded through our checkpoint loader computes what transformers' GPT-2 computes."""
import os
import re

import pytest
import torch

from common import toy_language
from common.gpt2_weights import CheckpointError, load_gpt2, read_safetensors
from common.model import GPT, GPTConfig
from common.plumbing.artifacts import load_model
from conftest import hf_model, load_lesson, run_here


def hub_state(ref):
    """The hub layout of openai-community/gpt2: no 'transformer.' prefix, mask buffers, no lm_head."""
    sd = {k: v.clone() for k, v in ref.transformer.state_dict().items()}
    P = ref.config.n_positions
    for i in range(ref.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, P, P))
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return sd


def save_layout(ref, folder, layout):
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    if layout == "save_pretrained":
        ref.save_pretrained(folder)
        return folder
    ref.config.to_json_file(os.path.join(folder, "config.json"))
    if layout == "hub-safetensors":
        # with the metadata the hub's GPT-2 file carries: not a tensor
        save_file(hub_state(ref), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    else:  # hub-bin
        torch.save(hub_state(ref), os.path.join(folder, "pytorch_model.bin"))
    return folder


def assert_parity(ref, ours):
    x = torch.randint(0, ref.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        r = ref(x, labels=x)
        logits, _ = ours(x)
        _, loss = ours(x[:, :-1], x[:, 1:])  # targets[:, t] follows idx[:, t]
    assert logits.shape == r.logits.shape
    assert (logits - r.logits).abs().max().item() < 1e-4
    assert abs(loss.item() - r.loss.item()) < 1e-5


@pytest.mark.parametrize("layout", ["hub-safetensors", "hub-bin", "save_pretrained"])
def test_parity_with_reference_for_each_layout(tmp_path, layout):
    ref = hf_model()  # head size 16, not GPT-2's 64: the config must be read from config.json
    config, state = load_gpt2(save_layout(ref, tmp_path / layout, layout))
    assert (config.n_layer, config.n_embd, config.n_head, config.block_size) == (2, 96, 6, 64)
    ours = GPT(config)
    ours.load_state_dict(state)
    assert_parity(ref, ours.eval())


def test_single_weights_file_infers_the_shape(tmp_path):
    from safetensors.torch import save_file
    ref = hf_model(n_layer=3, n_embd=128, n_head=2, n_positions=48, vocab_size=300)  # 64-wide heads, like GPT-2
    save_file(hub_state(ref), tmp_path / "weights.safetensors")
    config, state = load_gpt2(str(tmp_path / "weights.safetensors"))
    assert (config.n_layer, config.n_embd, config.n_head, config.block_size, config.vocab_size) == (3, 128, 2, 48, 300)
    ours = GPT(config)
    ours.load_state_dict(state)
    assert_parity(ref, ours.eval())


def test_our_safetensors_reader_matches_the_library(tmp_path):
    from safetensors.torch import load_file, save_file
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2).half(),
               "d": torch.randn(2, 2).bfloat16()}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    ours, lib = read_safetensors(str(tmp_path / "t.safetensors")), load_file(tmp_path / "t.safetensors")
    assert ours.keys() == lib.keys()
    for k in lib:
        assert ours[k].dtype == lib[k].dtype and torch.equal(ours[k], lib[k])


def test_missing_key_wrong_shape_and_junk_are_clear_errors(tmp_path):
    from safetensors.torch import save_file
    ref = hf_model()
    folder = save_layout(ref, tmp_path / "m", "hub-safetensors")
    sd = hub_state(ref)
    del sd["h.1.mlp.c_fc.weight"]
    save_file(sd, os.path.join(folder, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing h\.1\.mlp\.c_fc\.weight$"):
        load_gpt2(folder)
    # several missing: the first five named, and how many more, only when there are more
    keys = [k for k in hub_state(ref) if k.startswith("h.1.")]
    for n in (5, 6, 7):
        sd = {k: v for k, v in hub_state(ref).items() if k not in keys[:n]}
        save_file(sd, os.path.join(folder, "model.safetensors"))
        with pytest.raises(CheckpointError) as e:
            load_gpt2(folder)
        assert str(e.value).endswith("missing " + ", ".join(keys[:5]) + (f" and {n - 5} more" if n > 5 else "")), n
    sd = hub_state(ref)
    sd["h.0.attn.c_proj.weight"] = torch.zeros(96, 95)
    save_file(sd, os.path.join(folder, "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"h\.0\.attn\.c_proj\.weight has shape \(96, 95\)"):
        load_gpt2(folder)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="not a GPT-2 checkpoint"):
        load_gpt2(str(junk))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((10 ** 9).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_gpt2(str(broken))


def test_untied_lm_head_is_refused(tmp_path):
    ref = hf_model()
    sd = {"transformer." + k: v for k, v in ref.transformer.state_dict().items()}
    sd["lm_head.weight"] = torch.randn_like(sd["transformer.wte.weight"])
    torch.save(sd, tmp_path / "pytorch_model.bin")
    ref.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        load_gpt2(str(tmp_path))


def test_architecture_details():
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=4, n_head=2, n_embd=32)
    m = GPT(cfg)
    assert m.lm_head.weight is m.transformer.wte.weight  # tied
    assert m.transformer.h[0].ln_1.eps == 1e-5
    # residual projections start with std 0.02 / sqrt(2 * n_layer)
    torch.manual_seed(0)
    big = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=8, n_head=4, n_embd=256))
    assert abs(big.transformer.h[0].mlp.c_proj.weight.std().item() - 0.02 / 4) < 0.0005
    assert abs(big.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001
    logits, loss = m(torch.zeros(2, 5, dtype=torch.long))
    assert logits.shape == (2, 5, 64) and loss is None


def test_lesson01_writes_a_teacher_that_reproduces_the_reference(tmp_path):
    ref = hf_model(vocab_size=50257, n_positions=1024)  # GPT-2's context: a position table one can see
    folder = save_layout(ref, tmp_path / "hub", "hub-safetensors")
    r = run_here(["01_teacher.py", "--weights", folder, "--out", str(tmp_path / "art")])
    assert r.returncode == 0, r.stderr
    teacher, ckpt = load_model(str(tmp_path / "art" / "teacher.pt"), "teacher", vocab_size=50257)
    assert ckpt["language"] == "english" and "greedy continuation" in r.stdout
    assert_parity(ref, teacher)
    # its spec line: every parameter, and those left without the two embedding tables (tokens, positions)
    n, positions = teacher.num_params(), teacher.transformer.wpe.weight.numel()
    blocks = n - teacher.transformer.wte.weight.numel() - positions
    assert teacher.num_params(False) == blocks and f"{blocks / 1e6:.1f}" != f"{(blocks + positions) / 1e6:.1f}"
    assert (f"  parameters {n / 1e6:.1f}M ({blocks / 1e6:.1f}M without embeddings) | layers 2 | width 96 | "
            f"heads 6 | context 1024 | vocab 50257\n") in r.stdout
    # the look inside the file: the header read by hand lists what the reader loads, and the transpose holds
    assert "h.0.attn.c_attn.weight, F32 [96, 288]" in r.stdout, r.stdout
    assert "(96, 288) -> our nn.Linear's (out, in) (288, 96); ours equals the stored one transposed: True" in r.stdout
    lesson = load_lesson("01_teacher.py")
    # the passage's perplexity, by the reference: every token after its first predicted, nothing before it
    from common.tokenizer import get_tokenizer
    ids = torch.tensor([get_tokenizer().encode(lesson.PASSAGE)])
    with torch.no_grad():
        ppl = torch.exp(ref(ids, labels=ids).loss).item()
    assert ckpt["sanity"]["passage_ppl"] == pytest.approx(ppl, rel=1e-4)
    assert f"  perplexity on a short English passage: {ckpt['sanity']['passage_ppl']:.1f}  (" in r.stdout
    file = os.path.join(folder, "model.safetensors")
    n, header = lesson.peek_at_checkpoint(file)
    tensors = read_safetensors(file)
    assert {k: v["shape"] for k, v in header.items()} == {k: list(t.shape) for k, t in tensors.items()}
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        assert b'"__metadata__"' in f.read(length)  # as in the hub's file: a header entry, not a tensor
    assert f"an {length:,}-byte JSON header listing {len(tensors)} tensors; one of them" in r.stdout
    # the greedy continuation it printed is the reference's, from <|endoftext|> and the prompt
    from common.tokenizer import EOT, get_tokenizer
    enc = get_tokenizer()
    prompt = enc.encode(lesson.PROMPT)
    with torch.no_grad():
        out = ref.generate(torch.tensor([[EOT] + prompt]), max_new_tokens=24, do_sample=False,
                           eos_token_id=EOT, pad_token_id=EOT)[0, len(prompt) + 1:].tolist()
    text = enc.decode([t for t in prompt + out if t != EOT])
    assert f"greedy continuation: {text!r}" in r.stdout and ckpt["sanity"]["greedy"] == text


def test_lesson01_tiny_teacher_knows_the_toy_language(course):
    """The tiny preset's teacher was trained on the toy language: GPT-2's vocabulary and architecture,
    a perplexity on held-out documents close to the language's floor, and greedy text in its words."""
    out, stdout, _ = course
    teacher, ckpt = load_model(str(out / "teacher.pt"), "teacher", vocab_size=50257)
    assert ckpt["language"] == "toy" and teacher.config.n_layer == 2
    sanity = ckpt["sanity"]
    assert sanity["floor"] < sanity["passage_ppl"] < 1.5 * sanity["floor"]
    words = re.findall(r"[A-Za-z]+", sanity["greedy"])
    assert len(words) > 10 and all(w.lower() in toy_language.vocabulary() for w in words)
    assert "perplexity on 20 held-out toy documents" in stdout


def test_the_init_draws_every_weight_at_the_configs_std_and_the_residual_projections_scaled():
    """init_std 0.1 (the tiny preset's) reaches both embeddings and every matrix; the two projections
    into the residual stream get 0.1 / sqrt(2 n_layer); biases start at 0, LayerNorms at 1 and 0.
    Each std is measured over thousands of weights: within 10% of its value for any seed."""
    import math
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=2, n_embd=64, init_std=0.1))
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert not p.any(), name
        elif ".ln_" in name or name.startswith("transformer.ln_f"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            want = 0.1 / math.sqrt(2 * 4) if name.endswith("c_proj.weight") else 0.1
            assert p.std().item() == pytest.approx(want, rel=0.1), name
