"""Lesson 01: the teacher. Load OpenAI's pretrained GPT-2 (124M) into our own ~150-line GPT module
(common/model.py), look at its size, check that it writes sensible English, and save it. On the way,
open the checkpoint file by hand (a safetensors file is an 8-byte length, a JSON header, then raw
tensors) and see why four of GPT-2's matrices must be transposed for nn.Linear.
In knowledge distillation (KD) this model is the teacher: the large model whose outputs a smaller
student will learn to imitate (lessons 02 and 04).
With --preset tiny the teacher is instead a small GPT (same architecture and tokenizer, 2 layers)
trained here for a few seconds on a toy English language we wrote (common/toy_language.py), so the
whole course runs offline on a laptop and still has a teacher that knows a language.

Reads:  nothing (downloads GPT-2 once into ~/.cache/kd-course), or --weights PATH
Writes: artifacts/teacher.pt  ({"kind": "teacher", "config": {...}, "model": state_dict, ...})
Run:    python 01_teacher.py              (add --preset tiny for the toy-language teacher, offline)
"""
import json
import math
import os
import time

import torch

from common import toy_language
from common.gpt2_weights import SIZES, load_gpt2, read_safetensors
from common.model import GPT, GPTConfig
from common.plumbing.artifacts import model_checkpoint, run_lesson, save_artifact
from common.plumbing.cli import existing_path, lesson_parser, parse
from common.plumbing.device import keep_freed_memory
from common.plumbing.download import download_gpt2
from common.tokenizer import EOT, get_tokenizer

# --- settings ---
# --preset gpt2 downloads the real GPT-2. --preset tiny builds a small GPT with GPT-2's architecture
# and vocabulary and trains it on the toy language: 800 steps of 8 x 128 tokens.
TINY_TEACHER = GPTConfig(block_size=128, n_layer=2, n_head=4, n_embd=64)
TINY_STEPS = 800
SEED = 1337
TOY_HELD_OUT_SEED = 2  # documents the teacher never trained on (it trains on seed 1's stream)
PROMPT = "The history of science shows that"
PASSAGE = ("The river runs through the middle of the old town. In the summer, children swim near "
           "the bridge while their parents sit in the shade and talk. When autumn comes, the water "
           "rises and the boats that carry grain to the city can sail again.")


def peek_at_checkpoint(path):
    """A safetensors file's header, read by hand: the first 8 bytes (little-endian) are the header's
    length n; the next n bytes are JSON giving each tensor's dtype, shape and byte range in the data
    after it. (common/gpt2_weights.py reads the tensors themselves, memory-mapped.)"""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return n, header


# --- first looks: the plain ways (lesson 02 writes the real sampler, lesson 05 the real perplexity)
@torch.no_grad()
def greedy(model, tokens, n, eos):
    """The model's most likely continuation of tokens (a list), n tokens at most, ending after eos:
    the whole text through the model at every step (02's generate keeps a KV cache instead)."""
    x = torch.tensor([tokens])                           # (1, T)
    for _ in range(n):
        nxt = model(x)[0][0, -1].argmax()                # the likeliest token after the last one
        x = torch.cat([x, nxt.view(1, 1)], dim=1)
        if int(nxt) == eos:
            break
    return x[0, len(tokens):].tolist()


@torch.no_grad()
def plain_perplexity(model, texts):
    """exp of the mean negative log-likelihood per predicted token over texts (1-D token tensors
    that fit the context), every token after a text's first predicted from the ones before it."""
    nll, n = 0.0, 0
    for t in texts:
        _, loss = model(t[None, :-1], t[None, 1:])       # the mean over this text's predictions
        nll, n = nll + loss.item() * (len(t) - 1), n + len(t) - 1
    return math.exp(nll / n)


def main():
    p = lesson_parser(__doc__)
    p.add_argument("--model", default="gpt2", choices=SIZES,
                   help="which GPT-2 to download (default: gpt2, 124M)")
    p.add_argument("--weights", default=None, type=existing_path,
                   help="a GPT-2 folder (config.json + model.safetensors or pytorch_model.bin) or "
                        "weights file")
    args = parse(p)
    enc = get_tokenizer()

    # --- build the teacher ---
    t0 = time.time()
    file = None  # the checkpoint file, for a look inside
    if args.weights or args.preset != "tiny":
        path = args.weights or download_gpt2(args.model)
        config, state = load_gpt2(path)
        source = (f"weights from {args.weights}" if args.weights else
                  f"openai-community/{args.model} ({path})")
        file = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    else:
        config, state = TINY_TEACHER, None
        source = (f"tiny teacher: {config.n_layer} layers x {config.n_embd} wide, trained "
                  f"{TINY_STEPS} steps on the toy language (common/toy_language.py)")
    torch.manual_seed(SEED)
    model = GPT(config)
    if state is not None:
        model.load_state_dict(state)
        name = None
        if os.path.exists(file) and file.endswith(".safetensors"):  # the file, by hand
            n, header = peek_at_checkpoint(file)
            name = next((k for k in header if k.endswith("h.0.attn.c_attn.weight")), None)
        if name:
            info = header[name]
            print(f"{file}: an {n:,}-byte JSON header listing {len(header)} tensors; one of them: "
                  f"{name}, {info['dtype']} {info['shape']} at bytes {info['data_offsets']} of the "
                  f"data after it")
            # GPT-2 was written with TensorFlow "Conv1D" layers, which store a weight as (in, out)
            # and compute x @ W; nn.Linear stores (out, in) and computes x @ W.T. So the stored
            # matrix arrives transposed:
            stored, ours = read_safetensors(file)[name], model.transformer.h[0].attn.c_attn.weight
            same = torch.equal(ours, stored.t().to(ours.dtype))
            print(f"  stored (in, out) {tuple(stored.shape)} -> our nn.Linear's (out, in) "
                  f"{tuple(ours.shape)}; ours equals the stored one transposed: {same}")
    else:  # the tiny preset: learn the toy language (the stand-in for GPT-2's pretraining)
        keep_freed_memory()  # 2x faster steps: no fresh pages for the embedding's dense gradient
        print(f"training the tiny teacher on the toy language ({TINY_STEPS} steps):")
        n_used = toy_language.train_on_toy_language(model, TINY_STEPS, enc.encode, EOT, seed=1)
        print(f"  the language uses {n_used} of the {config.vocab_size:,} GPT-2 tokens")
    model.eval()
    print(f"teacher: {source}, ready in {time.time() - t0:.1f}s")

    # --- its spec ---
    print(f"  parameters {model.num_params() / 1e6:.1f}M "
          f"({model.num_params(embeddings=False) / 1e6:.1f}M without embeddings) | layers "
          f"{config.n_layer} | width {config.n_embd} | heads {config.n_head} | context "
          f"{config.block_size} | vocab {config.vocab_size}")

    # --- sanity checks: does it continue a prompt; how surprised is it by text of its language? ---
    # Perplexity = exp(mean negative log-likelihood per token): the number of equally likely tokens
    # the model is, on average, choosing between. A uniform guess over the vocabulary gives 50,257.
    toy = state is None
    prompt = enc.encode(toy_language.OPENINGS[0] if toy else PROMPT)
    written = greedy(model, [EOT] + prompt, 40 if toy else 24, EOT)
    greedy_text = enc.decode([t for t in prompt + written if t != EOT])
    print(f"  greedy continuation: {greedy_text!r}")
    if toy:  # held-out documents of the toy language, and the floor no model can beat on them
        held_out = toy_language.documents(20, TOY_HELD_OUT_SEED)
        ppl = plain_perplexity(model, [torch.tensor([EOT] + enc.encode(d) + [EOT])
                                       for d in held_out])
        floor = math.exp(toy_language.entropy_per_token(held_out, enc.encode))
        print(f"  perplexity on 20 held-out toy documents: {ppl:.2f}  (the language's own -log p "
              f"on them gives {floor:.2f}, what a model knowing the language exactly would "
              f"score; its entropy rate over 2,000 documents gives "
              f"{math.exp(toy_language.ENTROPY_RATE):.2f}; a uniform guess {config.vocab_size:,})")
    else:
        ppl, floor = plain_perplexity(model, [torch.tensor(enc.encode(PASSAGE))]), None
        print(f"  perplexity on a short English passage: {ppl:.1f}  (GPT-2 124M gives a few tens; "
              f"a uniform guess over the vocabulary would give {config.vocab_size:,})")

    # --- save ---
    path = f"{args.out}/teacher.pt"
    sanity = {"greedy": greedy_text, "passage_ppl": ppl, "floor": floor}
    save_artifact(model_checkpoint(model, "teacher", source=source, preset=args.preset,
                                   language="toy" if toy else "english", sanity=sanity), path)
    print(f"wrote {path}")


if __name__ == "__main__":
    run_lesson(main)
