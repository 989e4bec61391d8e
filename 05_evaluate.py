"""Lesson 05: how close did the student get? Perplexity, exp(mean negative log-likelihood per
token), written out for one sample here (perplexity_by_hand) and in batches with sliding windows in
common/perplexity.py, of the teacher, the untrained and the trained student, on:
  generated-test the teacher's held-out samples (openings never trained on): only the tokens it
                 sampled are scored, not its prompts (its own score is low by construction: it
                 chose likely tokens when it wrote them; docs/results.md)
  wikitext2      human-written Wikipedia text: did the student learn English?
  toy-language   the tiny preset's stand-in: held-out documents of the toy language, with its floor
  --eval-text    any text file of yours
and, on generated-test, top-1 agreement with the teacher and the KL over its stored top-K tokens.

Reads:  artifacts/teacher.pt, student_init.pt, student.pt, generated.pt (downloads WikiText-2 once)
Writes: artifacts/eval.pt
Run:    python 05_evaluate.py             (add --preset tiny to skip WikiText-2 by default)
"""
import argparse
import math
import os
import time
import zipfile

import torch

from common import toy_language
from common.distill import soft_kd_kl
from common.model import logits_fp32
from common.perplexity import score_sampled, sequences_nll, stream_nll
from common.plumbing.artifacts import (
    LessonError,
    load_artifact,
    load_model,
    run_lesson,
    save_artifact,
)
from common.plumbing.cli import existing_file, lesson_parser, nonneg_int, parse, positive_int
from common.plumbing.device import get_device, precision
from common.plumbing.download import cache_dir, download
from common.tokenizer import EOT, get_tokenizer

# --- settings (flags left unset take the preset's values) ---
# The tiny preset's teacher knows only the toy language: WikiText-2 would say nothing about it, so
# it is skipped, and held-out toy-language documents take its place.
PRESETS = {"gpt2": dict(wikitext=True), "tiny": dict(wikitext=False)}
# the teacher trained on seed 1's stream; 01 checked itself on seed 2
TOY_DOCUMENTS, TOY_SEED = 60, 3
WIKITEXT_URLS = [os.environ["KD_WIKITEXT_URL"]] if os.environ.get("KD_WIKITEXT_URL") else [
    "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
    "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip",
]
WIKITEXT_SIZE = 4_721_645
WIKITEXT_SHA256 = "ef7edb566e3e2b2d31b29c1fdb0c89a4cc683597484c3dc2517919c615435a11"
MODELS = {"teacher": "teacher.pt", "student_init": "student_init.pt", "student": "student.pt"}


def wikitext2_test():
    """The raw WikiText-2 test split as one string (downloaded and cached once); None offline."""
    dest = os.path.join(cache_dir(), "wikitext-2-raw-v1.zip")
    for url in WIKITEXT_URLS:
        try:
            download(url, dest, size=WIKITEXT_SIZE, sha256=WIKITEXT_SHA256, retries=2, timeout=20)
            with zipfile.ZipFile(dest) as z:
                return z.read("wikitext-2-raw/wiki.test.raw").decode("utf-8")
        except LessonError as e:
            print(f"  {e}")
    return None


@torch.no_grad()
def perplexity_by_hand(model, tokens, prompt_len):
    """Perplexity, written out, for one sample that fits in the model's window: exp of the mean
    negative log-likelihood of the tokens the model had to predict (not the prompt's). A perplexity
    of k: on average the model was as unsure as if it chose among k equally likely tokens.
    common/perplexity.py does the same in batches, and with sliding windows for long texts."""
    logits = logits_fp32(model, tokens[None, :-1])[0]            # (T-1, vocab): each next guess
    log_probs = torch.log_softmax(logits, dim=-1)
    rows = torch.arange(len(tokens) - 1, device=tokens.device)
    nll = -log_probs[rows, tokens[1:]]                            # -log p(the token that came next)
    return math.exp(nll[prompt_len - 1:].mean().item())          # from the first sampled token on


def agreement_and_kl(model, seqs, prompt_lens, topk, batch_size):
    """Share of the sampled positions where the model's most likely token is the teacher's, and the
    mean KL(teacher || model) over the teacher's stored top-K (the soft-KD loss at T = 1)."""
    def measure(y, logits, ids, logprobs):  # (n, V) and (n, K) at the n sampled positions
        agree = logits.argmax(-1) == ids[:, 0]  # [:, 0]: the teacher's top token
        return torch.stack([agree.float(), soft_kd_kl(logits, ids, logprobs, T=1.0)])
    sums, counts = score_sampled([model], seqs, prompt_lens, measure, batch_size, topk)
    agree, kl = (sums.sum(1) / counts.sum()).tolist()
    return agree, kl


def get_args():
    p = lesson_parser(__doc__)
    flag = p.add_argument
    flag("--stride", type=positive_int,
         help="sliding-window stride for long texts (default: the window, i.e. no overlap)")
    flag("--wikitext", action=argparse.BooleanOptionalAction,
         help="evaluate on WikiText-2 (gpt2: yes, tiny: no)")
    flag("--eval-text", type=existing_file, action="append", default=[],
         help="a text file to evaluate on (may be given several times)")
    flag("--max-tokens", type=nonneg_int, default=0,
         help="score at most this many tokens of each long text (0: all); on a CPU, WikiText-2's "
              "280k tokens take a while")
    flag("--batch-size", type=positive_int, default=8, help="windows or sequences per forward pass")
    return parse(p, PRESETS)


# --- the steps of main ---
def long_texts(args, enc):
    """The long texts to score with sliding windows ({name: 1-D tokens}: WikiText-2, --eval-text
    files) and the sets skipped, with why."""
    texts, skipped = {}, {}
    if args.wikitext:
        print("WikiText-2 (test split):")
        raw = wikitext2_test()
        if raw is None:
            skipped["wikitext2"] = "download failed (offline?)"
            print("  skipped wikitext2: could not download it (offline?); going on without it")
        else:
            texts["wikitext2"] = raw
    else:
        skipped["wikitext2"] = "off for this preset (--wikitext to include it)"
    for path in args.eval_text:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts[os.path.basename(path)] = f.read()
    streams = {}
    for name, text in texts.items():
        tokens = torch.tensor(enc.encode(text, allowed_special="all"))
        if args.max_tokens:
            tokens = tokens[:args.max_tokens]
        if len(tokens) < 2:
            raise LessonError(f"{name} holds fewer than 2 tokens: nothing to score")
        streams[name] = tokens
    return streams, skipped


def perplexities(models, sets, args, prec):
    """{set: {model: perplexity}}. A set is (sequences, prompt lengths), each sequence scored on its
    own with its prompt left out, or one long token stream, scored with sliding windows."""
    ppl = {}
    for set_name, items in sets.items():
        ppl[set_name] = {}
        for name, model in models.items():
            t0 = time.time()
            with prec.autocast():
                if isinstance(items, tuple):
                    nll, n = sequences_nll(model, items[0], batch_size=args.batch_size,
                                           prompt_lens=items[1])
                else:
                    nll, n = stream_nll(model, items, stride=args.stride,
                                        batch_size=args.batch_size)
            ppl[set_name][name] = math.exp(nll / n)
            print(f"  {set_name:<16} {name:<13} ppl {ppl[set_name][name]:>12,.2f}  ({n:,} tokens, "
                  f"{time.time() - t0:.1f}s)")
    return ppl


def print_table(ppl, floor, agreement, kl):
    """The perplexities (with the floor where known), then agreement and KL."""
    print(f"\n{'perplexity':<18}{'teacher':>12}{'student init':>14}{'student':>12}{'floor':>10}")
    for set_name, row in ppl.items():
        print(f"{set_name:<18}{row['teacher']:>12,.2f}{row['student_init']:>14,.2f}"
              f"{row['student']:>12,.2f}"
              + (f"{floor[set_name]:>10.2f}" if set_name in floor else ""))
    if floor:
        print(f"(floor: exp of the toy language's own -log p per token on this set, what a model "
              f"knowing the language exactly would score; no model beats it in expectation. The "
              f"language's entropy rate, estimated over 2,000 documents: "
              f"{math.exp(toy_language.ENTROPY_RATE):.2f})")
    if agreement:
        print("\non generated-test  top-1 agreement with teacher   "
              "top-K truncated KL(teacher || model)")
        for name in agreement:
            note = ("  (the teacher itself: 100%, and not 0: the cost of keeping only its top K)"
                    if name == "teacher" else "")
            print(f"  {name:<16}{agreement[name]:>14.1%}{kl[name]:>28.4f}{note}")


def main():
    args = get_args()
    enc = get_tokenizer()
    prec = precision(get_device())  # the device and the precision, decided once
    device = prec.device

    # --- the three models ---
    models = {}
    for name, file in MODELS.items():
        # the start may be a pretrained GPT-2 written by 01 (docs/your-models.md)
        kinds = ("student_init", "teacher") if name == "student_init" else name
        models[name], ckpt = load_model(f"{args.out}/{file}", kinds, vocab_size=enc.n_vocab)
        if name == "teacher":
            ckpt_teacher = ckpt
        models[name].to(device)
        if name == "student" and ckpt["config"] != models["student_init"].config.__dict__:
            raise LessonError(f"{args.out}/student.pt does not match {args.out}/student_init.pt "
                              f"(different config): run 04_train.py again after 03_student.py")
    window = min(m.config.block_size for m in models.values())
    if args.stride and args.stride > window:
        raise LessonError(f"--stride {args.stride} is larger than the window ({window} tokens)")

    # --- the evaluation sets ---
    data = load_artifact(f"{args.out}/generated.pt", "generated", keys=("test", "test_prompt_lens"))
    test, test_P = data["test"], data["test_prompt_lens"]
    s = data.get("settings", {})
    sampling = (f"T={s.get('temperature', '?')}, top-k {s.get('top_k', '?')}, "
                f"top-p {s.get('top_p', '?')}")
    streams, skipped = long_texts(args, enc)
    toy_docs, floor = None, {}
    if ckpt_teacher.get("language") == "toy":
        toy_docs = toy_language.documents(TOY_DOCUMENTS, TOY_SEED)
        floor["toy-language"] = math.exp(toy_language.entropy_per_token(toy_docs, enc.encode))
        # each document read after <|endoftext|>, as the teacher was trained
        toy_docs = [torch.tensor([EOT] + enc.encode(d) + [EOT]) for d in toy_docs]
    print(f"sets: generated-test ({len(test)} samples, "
          f"{sum(len(s) - P for s, P in zip(test, test_P)):,} sampled tokens)"
          + (f", toy-language ({len(toy_docs)} documents)" if toy_docs else "")
          + "".join(f", {n} ({len(t):,} tokens)" for n, t in streams.items())
          + f" | window {window}, stride {args.stride or window} | {device} {prec.dtype}")

    # --- perplexity, by hand, of the teacher on one test sample; then with common/perplexity.py ---
    one = test[0].to(device)
    nll, n = sequences_nll(models["teacher"], [one], prompt_lens=test_P[:1])
    print(f"by hand, the teacher on test sample 0 ({n} sampled tokens): perplexity "
          f"{perplexity_by_hand(models['teacher'], one, test_P[0]):.3f}; common/perplexity.py: "
          f"{math.exp(nll / n):.3f}")
    sets = {"generated-test": (test, test_P)}
    if toy_docs:
        sets["toy-language"] = (toy_docs, [1] * len(toy_docs))
    ppl = perplexities(models, {**sets, **streams}, args, prec)

    # --- imitation: top-1 agreement and KL on the teacher's own held-out samples ---
    agreement, kl = {}, {}
    if data.get("test_topk_ids"):
        topk = (data["test_topk_ids"], data["test_topk_logprobs"])
        for name in ("student_init", "student", "teacher"):
            with prec.autocast():
                agreement[name], kl[name] = agreement_and_kl(models[name], test, test_P, topk,
                                                             args.batch_size)
    else:
        print("  generated.pt has no top-K data (--topk-logits 0): agreement and KL skipped")

    # --- the table ---
    print_table(ppl, floor, agreement, kl)
    print(f"(the teacher's generated-test perplexity is low partly by construction: it sampled "
          f"those tokens with {sampling}; compare models on text nobody sampled from them: "
          f"wikitext2, or toy-language)")
    for set_name, why in skipped.items():
        print(f"skipped {set_name}: {why}")

    path = f"{args.out}/eval.pt"
    save_artifact({"kind": "eval", "preset": args.preset, "perplexity": ppl, "floor": floor,
                   "agreement": agreement, "kl": kl, "skipped": skipped,
                   "teacher_source": ckpt_teacher.get("source"), "sampling": sampling,
                   "stride": args.stride or window, "window": window, "device": device,
                   "dtype": prec.dtype}, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    run_lesson(main, oom="a smaller --batch-size (sequences measured at once)")
