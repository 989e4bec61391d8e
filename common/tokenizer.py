"""GPT-2's tokenizer, built offline from the ranks file shipped in this folder.

tiktoken.get_encoding("gpt2") would download the vocabulary the first time; we build the same
Encoding from common/gpt2.tiktoken (OpenAI's GPT-2 byte-pair ranks, MIT licence), so the course
tokenizes without a network. Without that file (course.ipynb uploaded alone to Colab), tiktoken's
r50k_base gives the same ranks: its file is byte-identical to ours (sha256 306cd27f...dd930),
downloaded once and cached.
"""
import base64
import functools
import os

import tiktoken

RANKS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpt2.tiktoken")
EOT = 50256  # <|endoftext|>: separates documents in GPT-2's training data

# GPT-2's pre-tokenizer: split text into words, numbers, punctuation runs and spaces before BPE
# (the same pattern tiktoken uses for "gpt2"/r50k_base).
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class TokenizerError(RuntimeError):
    """GPT-2's ranks are neither beside this file nor in tiktoken's cache, and cannot be fetched."""

    def _render_traceback_(self):  # IPython's hook: in a notebook cell, this line, not a traceback
        return [f"error: {self}"]


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    if not os.path.exists(RANKS_FILE):  # the notebook alone: the same ranks, through tiktoken
        try:
            return tiktoken.get_encoding("r50k_base")
        except Exception as e:  # offline, and tiktoken has not cached the file yet
            raise TokenizerError(f"GPT-2's tokenizer: {RANKS_FILE} is missing and tiktoken "
                                 f"could not download r50k_base ({type(e).__name__}): connect "
                                 f"once, or put gpt2.tiktoken from the repository there") from None
    ranks = {}
    with open(RANKS_FILE, "rb") as f:
        for line in f:  # each line: base64 of a byte string, then its rank (= token id)
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(name="gpt2", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=50257)
