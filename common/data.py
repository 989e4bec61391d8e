"""The teacher's samples as a model's inputs and targets: padded into batches, the prompt left
unscored. Each sample is a document that starts with <|endoftext|>: x[:, t] is token t, y[:, t]
token t + 1, the one to predict; a target the model was given rather than had to predict (a prompt's
token, padding) is -100, which cross_entropy skips. Lesson 02 writes the samples and their prompt
lengths; every lesson that trains or scores on them batches them here.
"""
import torch


def pad_batch(seqs, prompt_lens=None, device="cpu"):
    """Pad token sequences into inputs x (B, L) and targets y (B, L); y[i, t] = seqs[i][t + 1].

    Padding targets are -100 (cross_entropy skips them). So are the targets inside a prompt: with
    prompt_lens[i] = P, tokens 0 .. P-1 were given, not predicted, so only targets t >= P - 1
    (tokens P, P+1, ...) are scored. The <|endoftext|> that ends a sample is a real target: the
    model must learn when to stop.
    """
    B, L = len(seqs), max(len(s) for s in seqs) - 1
    x = torch.zeros(B, L, dtype=torch.long)
    y = torch.full((B, L), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = torch.as_tensor(s)
        x[i, :len(s) - 1] = s[:-1]
        y[i, :len(s) - 1] = s[1:]
        if prompt_lens is not None:
            y[i, :max(0, prompt_lens[i] - 1)] = -100
    return x.to(device), y.to(device)


def make_batch(seqs, topk_ids=None, topk_logprobs=None, device="cpu", prompt_lens=None):
    """pad_batch's inputs x (B, L) and targets y (B, L) and, if given, the teacher's cache: top-K
    ids and log-probs, or sampled ids and counts, padded to (B, L, K) (K the widest row's)."""
    # Padded, not packed several to a row: each sample is a document that starts with
    # <|endoftext|>, and its stored teacher distributions line up with its own positions.
    x, y = pad_batch(seqs, prompt_lens)
    out = [x.to(device), y.to(device)]
    if topk_ids is not None:
        B, L, K = x.size(0), x.size(1), max(a.size(-1) for a in topk_ids)
        ids = torch.zeros(B, L, K, dtype=torch.int32)
        lps = torch.zeros(B, L, K, dtype=topk_logprobs[0].dtype)  # a padded count is 0: no weight
        for i, (a, b) in enumerate(zip(topk_ids, topk_logprobs)):
            ids[i, :len(a), :a.size(-1)] = a
            lps[i, :len(b), :b.size(-1)] = b
        out += [ids.to(device), lps.to(device)]
    return out


def batches(seqs, prompt_lens, batch_size, device="cpu", topk=None):
    """The sequences in order, batch_size at a time, as make_batch's (x, y) or, given the
    teacher's stored top-K (topk: its ids and its log-probs, a list of each), (x, y, ids,
    log-probs)."""
    for i in range(0, len(seqs), batch_size):
        rows = slice(i, i + batch_size)
        stored = (topk[0][rows], topk[1][rows]) if topk is not None else ()
        yield make_batch(seqs[rows], *stored, device=device, prompt_lens=prompt_lens[rows])
