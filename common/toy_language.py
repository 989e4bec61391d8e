"""A toy language, written by us: the offline preset's world.

Short stories in plain English over a vocabulary of a few hundred common words, with structure a
model can only learn by looking back (attention), not by counting word pairs:
  - a character is introduced, then referred to by name or by the right pronoun (he / she);
  - a subject agrees with its verb across a clause ("The cats that Anna found were happy.");
  - a quote that opens also closes;
  - a count goes up one by one and the total is said again ("one, two, three. There were three
    cats.").
Documents are separated by <|endoftext|>, as in GPT-2's training data, and tokenized with GPT-2's
tokenizer like everything else in the course.

The generator makes every random choice through `choose`, with explicit probabilities, so it knows
the exact probability of any text: replaying the same code against a text, trying every option whose
words match, sums the probabilities of all the ways it could have written it (`log_prob`). Averaged
over held-out documents, -log p per GPT-2 token is the language's entropy rate: the floor no model
can beat (`entropy_per_token`).
"""
import functools
import math
import random
import time

# --- the vocabulary ---
NAMES = {"Tom": "he", "Sam": "he", "Ben": "he", "Max": "he", "Leo": "he", "Jack": "he",
         "Paul": "he", "Hugo": "he", "Anna": "she", "Lucy": "she", "Mia": "she", "Emma": "she",
         "Lily": "she", "Rose": "she", "Kate": "she", "Nora": "she"}
JOBS = ["farmer", "teacher", "baker", "doctor", "sailor", "painter", "singer", "driver", "cook",
        "builder", "gardener", "writer"]
ADJECTIVES = ["happy", "sad", "tired", "brave", "quiet", "small", "big", "old", "young", "kind",
              "busy", "clever", "funny", "lucky", "proud", "angry", "calm", "shy", "strong",
              "gentle"]
NOUNS = {"cat": "cats", "dog": "dogs", "bird": "birds", "fish": "fish", "apple": "apples",
         "book": "books", "ball": "balls", "boat": "boats", "cake": "cakes", "hat": "hats",
         "box": "boxes", "cup": "cups", "flower": "flowers", "horse": "horses", "key": "keys",
         "letter": "letters", "stone": "stones", "tree": "trees", "chair": "chairs", "egg": "eggs",
         "shoe": "shoes", "star": "stars", "coin": "coins", "bell": "bells"}
VERBS = ["saw", "found", "liked", "took", "made", "painted", "washed", "carried", "bought", "lost",
         "kept", "gave away"]
PLACES = ["the park", "the river", "the market", "the forest", "the school", "the garden",
          "the hill", "the farm", "the beach", "the town", "the lake", "the bridge"]
PREPOSITIONS = ["in", "at", "near"]
WANTS = ["like", "want", "see", "need", "love"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven"]
TIMES = ["today", "tomorrow", "soon", "now"]


def vocabulary():
    """Every word the language uses (lower case, without punctuation)."""
    words = set()
    for group in (NAMES, JOBS, ADJECTIVES, VERBS, PLACES, PREPOSITIONS, WANTS, NUMBERS, TIMES):
        for item in group:
            words.update(item.lower().split())
    for sg, pl in NOUNS.items():
        words.update((sg, pl))
    words.update("was were a an the that he she him her said i we will go to counted there in end "
                 "once called with went home".split())
    return words


# --- the grammar: one function that writes a document through choose() and emit() ---

def _uniform(options):
    return _uniform_of(tuple(options))


@functools.cache  # built once per list: the grammar asks for the same ones again and again
def _uniform_of(options):
    return [(o, 1 / len(options)) for o in options]


_MAYBE_ADJECTIVE = [(None, 0.5)] + [(a, 0.5 / len(ADJECTIVES)) for a in ADJECTIVES]  # half: none


def _document(w):
    """Write one story. w.choose(pairs) picks one of [(option, probability), ...]; w.emit adds text.
    Each choice's words are emitted right after it, so that replaying against a text (log_prob) can
    drop a wrong branch at its first word."""
    # "Tom was a ..." or "Once there was a ... called Tom"
    opening = w.choose([("short", 0.5), ("long", 0.5)])
    if opening == "short":
        name = w.choose(_uniform(NAMES))
        w.emit(f"{name} was")
    else:
        w.emit("Once there was")
    job_adj = w.choose(_uniform(ADJECTIVES))
    w.emit(f" {article(job_adj)} {job_adj}")
    w.emit(f" {w.choose(_uniform(JOBS))}")
    if opening == "long":
        w.emit(" called")
        name = w.choose(_uniform(NAMES))
        w.emit(f" {name}")
    w.emit(".")
    pronoun = NAMES[name]

    def subject(lower=False):  # the character again: by name, or by the pronoun that fits the name
        if w.choose([("name", 0.4), ("pronoun", 0.6)]) == "name":
            return name
        return pronoun if lower else pronoun.capitalize()

    def noun_phrase():  # "a dog", "an old dog", "the dog", ...
        definite = w.choose([(False, 0.5), (True, 0.5)])
        adj = w.choose(_MAYBE_ADJECTIVE)
        noun = w.choose(_uniform(NOUNS)) if adj is None else None
        first = adj or noun
        w.emit(f" {'the' if definite else article(first)} {first}")
        if adj is not None:
            w.emit(f" {w.choose(_uniform(NOUNS))}")

    n_sentences = w.choose([(2, 0.2), (3, 0.3), (4, 0.3), (5, 0.2)])
    for _ in range(n_sentences):
        kind = w.choose([("action", 0.3), ("clause", 0.2), ("quote", 0.2), ("count", 0.15),
                         ("went", 0.15)])
        if kind == "action":
            w.emit(f" {subject()}")
            w.emit(f" {w.choose(_uniform(VERBS))}")
            noun_phrase()
            if w.choose([(False, 0.5), (True, 0.5)]):
                w.emit(f" {w.choose(_uniform(PREPOSITIONS))}")
                w.emit(f" {w.choose(_uniform(PLACES))}")
            w.emit(".")
        elif kind == "clause":  # agreement across the relative clause
            plural = w.choose([(False, 0.5), (True, 0.5)])
            noun = w.choose(_uniform(NOUNS))
            w.emit(f" The {NOUNS[noun] if plural else noun} that")
            w.emit(f" {subject(lower=True)}")
            w.emit(f" {w.choose(_uniform(VERBS))} {'were' if plural else 'was'}")
            w.emit(f" {w.choose(_uniform(ADJECTIVES))}.")
        elif kind == "quote":  # a quote that closes
            w.emit(f" {subject()} said,")
            if w.choose([("want", 0.5), ("go", 0.5)]) == "want":
                w.emit(f' "I {w.choose(_uniform(WANTS))} the')
                w.emit(f" {NOUNS[w.choose(_uniform(NOUNS))]}.\"")
            else:
                w.emit(f' "We will go to {w.choose(_uniform(PLACES))}')
                w.emit(f' {w.choose(_uniform(TIMES))}."')
        elif kind == "count":  # a count that goes up, and its total said again
            w.emit(f" {subject()} counted the")
            noun = NOUNS[w.choose(_uniform(NOUNS))]
            w.emit(f" {noun}:")
            n = w.choose([(k, p) for k, p in zip(range(2, 8), (0.25, 0.25, 0.2, 0.15, 0.1, 0.05))])
            w.emit(f" {', '.join(NUMBERS[:n])}. There were {NUMBERS[n - 1]} {noun}.")
        else:
            w.emit(f" {subject()} went to")
            w.emit(f" {w.choose(_uniform(PLACES))} with")
            w.emit(f" {w.choose(_uniform([n for n in NAMES if n != name]))}.")
    if w.choose([("end", 0.5), ("none", 0.5)]) == "end":
        w.emit(f" In the end, {name} was {w.choose(_uniform(ADJECTIVES))}.")


def article(word):
    return "an" if word[0] in "aeiou" else "a"


# --- writing ---

class _Writer:
    def __init__(self, rng):
        self.rng, self.parts, self.logp = rng, [], 0.0

    def choose(self, pairs):
        r, acc = self.rng.random(), 0.0
        for option, p in pairs:
            acc += p
            if r < acc:
                break
        self.logp += math.log(p)
        return option

    def emit(self, text):
        self.parts.append(text)


def sample_document(rng):
    """(text, log-probability of the choices made) for one document, drawn with random.Random."""
    w = _Writer(rng)
    _document(w)
    return "".join(w.parts), w.logp


def documents(n, seed):
    """n documents (texts), deterministic for a seed."""
    rng = random.Random(seed)
    return [sample_document(rng)[0] for _ in range(n)]


# --- scoring: replay the grammar against a text ---

class _NeedChoice(Exception):
    def __init__(self, pairs):
        self.pairs = pairs


class _Mismatch(Exception):
    pass


class _Replay:
    """Runs the grammar with the first choices fixed; stops at the first choice not yet fixed, or as
    soon as the text written so far stops matching the target."""

    def __init__(self, fixed, target):
        self.fixed, self.target, self.i, self.end, self.logp = fixed, target, 0, 0, 0.0

    def choose(self, pairs):
        if self.i == len(self.fixed):
            raise _NeedChoice(pairs)
        option, p = pairs[self.fixed[self.i]]
        self.i += 1
        self.logp += math.log(p)
        return option

    def emit(self, text):  # the target must go on with this text where the last one ended
        if not self.target.startswith(text, self.end):
            raise _Mismatch
        self.end += len(text)


def log_prob(text):
    """Natural log of the probability that the language writes exactly `text` as one document
    (-inf if it cannot). Depth-first over the choices, pruned as soon as the words stop matching;
    every way of writing the text is found and their probabilities added."""
    total, stack = -math.inf, [[]]
    while stack:
        fixed = stack.pop()
        replay = _Replay(fixed, text)
        try:
            _document(replay)
        except _NeedChoice as need:
            stack.extend(fixed + [j] for j in range(len(need.pairs)) if need.pairs[j][1] > 0)
            continue
        except _Mismatch:
            continue
        if replay.end == len(text):
            total = max(total, replay.logp) + math.log1p(math.exp(-abs(total - replay.logp))) \
                if total > -math.inf else replay.logp
    return total


# The language's entropy rate, estimated: entropy_per_token over 2,000 documents (seed 5), 1.0165
# nats per GPT-2 token, perplexity 2.76. Measured with: python -c "from common import toy_language
# as t; from common.tokenizer import get_tokenizer; print(t.entropy_per_token(t.documents(2000, 5),
# get_tokenizer().encode))"  (3 minutes). Lesson 05's 60-document set gives 2.95.
ENTROPY_RATE = 1.0165


def entropy_per_token(texts, encode):
    """The floor: -sum log p(document) / the GPT-2 tokens a model must predict for them. Each
    document is read after an <|endoftext|> and its own closing <|endoftext|> is predicted too (+1
    token)."""
    nats = -sum(log_prob(t) for t in texts)
    tokens = sum(len(encode(t)) + 1 for t in texts)
    return nats / tokens


# --- openings: how a document may start, for lesson 02's prompts ---
# "Tom was a happy", "Anna was an old", ...: 40 distinct, valid beginnings of a story.
OPENINGS = [f"{name} was {article(adj)} {adj}" for name, adj in
            ((list(NAMES)[i % len(NAMES)], ADJECTIVES[(7 * i) % len(ADJECTIVES)])
             for i in range(40))]


# --- training a small GPT on the language: the offline stand-in for GPT-2's pretraining ---

def token_stream(rng, n_tokens, encode, eot):
    """At least n_tokens of fresh documents, each after an <|endoftext|>, as GPT-2 saw its data."""
    out = []
    while len(out) < n_tokens:
        out += [eot] + encode(sample_document(rng)[0])
    return out


def used_tokens(encode, eot, n_docs=3000, seed=7):
    """The GPT-2 token ids the language uses (found in n_docs documents), plus <|endoftext|>."""
    return sorted({t for d in documents(n_docs, seed) for t in encode(d)} | {eot})


def train_on_toy_language(model, steps, encode, eot, batch_size=8, lr=3e-3, seed=1, log=print):
    """Train `model` (a GPT with GPT-2's vocabulary) in place on fresh documents of the language,
    in seconds on a CPU: the tokens it never uses keep a zero embedding, so the softmax needs only
    the used tokens' logits. Returns how many tokens it uses."""
    # The language uses a few hundred of GPT-2's 50,257 tokens. The others' embedding rows are
    # zeroed and stay zero (AdamW without weight decay never moves a parameter whose gradient is
    # always zero), so their logits are exactly 0 and log Z = logsumexp(the used logits, and
    # log(n_unused) for the zeros): the same model and cross-entropy as the full softmax.
    import torch  # here, so that the language itself needs only the standard library

    rng = random.Random(seed)
    V = model.config.vocab_size
    used = torch.tensor(used_tokens(encode, eot))
    unused = torch.ones(V, dtype=torch.bool)
    unused[used] = False
    index = torch.full((V,), -1, dtype=torch.long)
    index[used] = torch.arange(len(used))  # token id -> its column among the used logits
    wte = model.transformer.wte.weight
    with torch.no_grad():
        wte[unused] = 0
    log_n_unused = torch.tensor(math.log(V - len(used)))
    from common.model import fused_adamw
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=fused_adamw(wte.device))
    T = model.config.block_size
    model.train()
    started = time.time()
    for step in range(steps):
        for group in opt.param_groups:  # warmup, then cosine down to lr / 10
            cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * step / steps))
            group["lr"] = lr * min(1.0, (step + 1) / 20) * cosine
        n = batch_size * (T + 1)
        tokens = torch.tensor(token_stream(rng, n, encode, eot)[:n])
        x, y = tokens.view(batch_size, T + 1)[:, :-1], tokens.view(batch_size, T + 1)[:, 1:]
        if bool(unused[tokens].any()):  # never seen in 40,000 documents; say so, not fail in gather
            raise ValueError("the toy language wrote a token missing from used_tokens(): raise its "
                             "n_docs")
        logits = model.hidden(x) @ wte[used].T                                  # (B, T, used)
        log_z = torch.logaddexp(torch.logsumexp(logits, dim=-1), log_n_unused)  # (B, T) all V
        loss = (log_z - logits.gather(-1, index[y].unsqueeze(-1)).squeeze(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % max(1, steps // 10) == 0:
            seconds = time.time() - started
            log(f"  step {step + 1:4d}/{steps} | loss {loss.item():.3f} nats/token | {seconds:.0f}s"
                f" | eta {seconds / (step + 1) * (steps - step - 1):.0f}s")
    model.eval()
    return len(used)
