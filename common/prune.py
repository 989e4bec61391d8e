"""Cutting a smaller GPT out of a bigger one (Minitron: Muralidharan et al., 2024): keep some of its
blocks, heads, MLP neurons and residual channels, and slice every weight to match. Which units to
keep is 03_student.py --prune's lesson: it scores them; here is only the cutting.
"""
import torch

from common.model import GPT, GPTConfig


def hidden_skipping(model, x, skip=None):
    """model.hidden(x) (B, T, C) with block `skip` left out: its input passes on unchanged."""
    pos = torch.arange(x.size(1), device=x.device)
    h = model.transformer.wte(x) + model.transformer.wpe(pos)
    for i, block in enumerate(model.transformer.h):
        if i != skip:
            h = block(h)
    return model.transformer.ln_f(h)


def choose(scores, k, how="top", generator=None):
    """The indices of k units kept, in their original order: the k highest scores ("top"), the k
    lowest ("bottom", to check that importance matters) or k at random ("random")."""
    if how == "random":
        picked = torch.randperm(len(scores), generator=generator)[:k]
    else:
        picked = scores.topk(k, largest=how == "top").indices
    return picked.sort().values


def cut(model, layers, heads, neurons, channels):
    """A GPT of the kept units, its weights sliced from model's. layers: the blocks kept; heads[i]
    and neurons[i]: those kept in layers[i]; channels: the residual stream's kept channels (the
    same in every block, the embeddings, each LayerNorm and the tied output layer)."""
    t = model.config
    hs = t.n_embd // t.n_head  # a head's size stays the teacher's
    c = torch.as_tensor(channels)
    config = GPTConfig(**{**t.__dict__, "n_layer": len(layers), "n_head": len(heads[0]),
                          "n_embd": len(c)})
    wte = model.transformer.wte.weight
    small = GPT(config).to(wte.device, wte.dtype)
    ours, theirs = small.state_dict(), model.state_dict()

    def put(name, value):
        ours[name].copy_(value)

    put("transformer.wte.weight", theirs["transformer.wte.weight"][:, c])  # lm_head: tied to it
    put("transformer.wpe.weight", theirs["transformer.wpe.weight"][:, c])
    for p in ("weight", "bias"):
        put(f"transformer.ln_f.{p}", theirs[f"transformer.ln_f.{p}"][c])
    for new, (old, kept_heads, n) in enumerate(zip(layers, heads, neurons)):
        T, S = f"transformer.h.{old}.", f"transformer.h.{new}."
        d = torch.cat([torch.arange(h * hs, (h + 1) * hs) for h in kept_heads])  # heads' dims
        qkv = torch.cat([d, d + t.n_embd, d + 2 * t.n_embd])  # q, k and v: the same heads
        for p in ("weight", "bias"):
            put(S + f"ln_1.{p}", theirs[T + f"ln_1.{p}"][c])
            put(S + f"ln_2.{p}", theirs[T + f"ln_2.{p}"][c])
        put(S + "attn.c_attn.weight", theirs[T + "attn.c_attn.weight"][qkv][:, c])  # (3C, C)
        put(S + "attn.c_attn.bias", theirs[T + "attn.c_attn.bias"][qkv])
        put(S + "attn.c_proj.weight", theirs[T + "attn.c_proj.weight"][c][:, d])    # (C, C)
        put(S + "attn.c_proj.bias", theirs[T + "attn.c_proj.bias"][c])
        put(S + "mlp.c_fc.weight", theirs[T + "mlp.c_fc.weight"][n][:, c])          # (4C, C)
        put(S + "mlp.c_fc.bias", theirs[T + "mlp.c_fc.bias"][n])
        put(S + "mlp.c_proj.weight", theirs[T + "mlp.c_proj.weight"][c][:, n])      # (C, 4C)
        put(S + "mlp.c_proj.bias", theirs[T + "mlp.c_proj.bias"][c])
    return small.eval()
