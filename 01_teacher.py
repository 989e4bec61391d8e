"""Lesson 01: the teacher. Load OpenAI's pretrained GPT-2 (124M) into our own ~150-line GPT module
(common/model.py), look at its size, check that it writes sensible English, and save it.

Reads:  nothing (downloads GPT-2 once into ~/.cache/kd-course), or --weights PATH
Writes: artifacts/teacher.pt  ({"kind": "teacher", "config": {...}, "model": state_dict, ...})
Run:    python 01_teacher.py              (add --preset tiny for a synthetic teacher, offline, on a CPU)
"""
import time

import torch

from common.artifacts import model_checkpoint, run_lesson, save_artifact
from common.cli import existing_path, lesson_parser, parse
from common.gpt2_weights import SIZES, download_gpt2, load_gpt2
from common.model import GPT, GPTConfig
from common.perplexity import perplexity
from common.sampling import generate
from common.tokenizer import get_tokenizer

# --- settings ---
# --preset gpt2 downloads the real GPT-2. --preset tiny builds a synthetic teacher instead: GPT-2's
# architecture and vocabulary but 2 small layers of random weights. Its init is 20x larger than
# GPT-2's, which makes its next-token distributions peaked, so its text has structure to learn.
TINY_TEACHER = GPTConfig(block_size=128, n_layer=2, n_head=4, n_embd=64, init_std=0.4)
SEED = 1337
PROMPT = "The history of science shows that"
PASSAGE = ("The river runs through the middle of the old town. In the summer, children swim near the bridge "
           "while their parents sit in the shade and talk. When autumn comes, the water rises and the boats "
           "that carry grain to the city can sail again.")


def main():
    p = lesson_parser(__doc__)
    p.add_argument("--model", default="gpt2", choices=SIZES, help="which GPT-2 to download (default: gpt2, 124M)")
    p.add_argument("--weights", default=None, type=existing_path,
                   help="a GPT-2 folder (config.json + model.safetensors or pytorch_model.bin) or weights file")
    args = parse(p)
    enc = get_tokenizer()

    # --- build the teacher ---
    t0 = time.time()
    if args.weights:
        config, state = load_gpt2(args.weights)
        source = f"weights from {args.weights}"
    elif args.preset == "tiny":
        config, state = TINY_TEACHER, None
        source = f"SYNTHETIC tiny teacher (random weights, seed {SEED}, init_std {config.init_std})"
    else:
        folder = download_gpt2(args.model)
        config, state = load_gpt2(folder)
        source = f"openai-community/{args.model} ({folder})"
    torch.manual_seed(SEED)
    model = GPT(config)
    if state is not None:
        model.load_state_dict(state)
    model.eval()
    print(f"teacher: {source}, ready in {time.time() - t0:.1f}s")
    if state is None:
        print("  NOTE: this teacher is synthetic. It is a stand-in for GPT-2 so the course runs offline in seconds;"
              " its text is not English.")

    # --- its spec ---
    print(f"  parameters {model.num_params() / 1e6:.1f}M ({model.num_params(embeddings=False) / 1e6:.1f}M without "
          f"embeddings) | layers {config.n_layer} | width {config.n_embd} | heads {config.n_head} "
          f"| context {config.block_size} | vocab {config.vocab_size}")

    # --- sanity checks: does it continue a prompt, and how surprised is it by a passage of English? ---
    prompt = torch.tensor([enc.encode(PROMPT)])
    greedy = generate(model, prompt, max_new_tokens=24, temperature=0)
    print(f"  greedy continuation: {enc.decode(greedy[0].tolist())!r}")
    ppl = perplexity(model, torch.tensor(enc.encode(PASSAGE)))
    print(f"  perplexity on a short English passage: {ppl:.1f}  (GPT-2 124M gives a few tens; "
          f"a uniform guess over the vocabulary would give {config.vocab_size:,})")

    # --- save ---
    path = f"{args.out}/teacher.pt"
    save_artifact(model_checkpoint(model, "teacher", source=source, synthetic=state is None,
                                   sanity={"greedy": enc.decode(greedy[0].tolist()), "passage_ppl": ppl}), path)
    print(f"wrote {path}")


if __name__ == "__main__":
    run_lesson(main)
