"""GPT-2, written out in full: the one model class that both teacher and student use.

The teacher is this module loaded with OpenAI's GPT-2 weights (see gpt2_weights.py); the student is
the same module with fewer, narrower layers. Parameter names follow GPT-2's own
(transformer.h.0.attn.c_attn ...), so loading the published weights is a rename-free copy.
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024       # longest context (GPT-2 learns one embedding per position)
    vocab_size: int = 50257      # GPT-2's BPE: 256 bytes + 50,000 merges + <|endoftext|>
    n_layer: int = 12            # transformer blocks
    n_head: int = 12             # attention heads per block
    n_embd: int = 768            # width of the residual stream
    dropout: float = 0.0         # on attention, MLP and embeddings (0: inference, distillation)
    layer_norm_eps: float = 1e-5  # GPT-2's LayerNorm epsilon
    init_std: float = 0.02       # std of the weight init (GPT-2's 0.02)

    @classmethod
    def from_dict(cls, d):
        """Build from a checkpoint's config dict; unknown keys are an error, missing ones take
        defaults."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        return cls(**d)


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated once.

    Generation feeds one new token per step; without a cache each step would recompute attention
    keys/values for the whole prefix. Writing into a preallocated buffer (rather than torch.cat each
    step) avoids copying the whole cache every step.
    """

    def __init__(self, config, batch_size, max_len, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # how many positions are filled

    def update(self, layer, k, v):
        """Store this step's k, v (B, nh, T, hs) for `layer`; return all keys/values so far."""
        T = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.layer_idx = layer_idx
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v of all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJ = True  # init scaled down, see GPT._init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)

        past = 0
        if kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, past + T, hs)

        # scaled_dot_product_attention computes softmax(q @ k^T / sqrt(hs) + mask) @ v, with the
        # mask hiding future positions, in one fused kernel (flash/memory-efficient where it can).
        if past == 0:  # the usual case: no cache, or the prompt filling an empty cache
            mask, causal = None, True
        elif T == 1:   # one new token may look at every cached position
            mask, causal = None, False
        else:          # several new tokens after a cached prefix: token i sees past + i + 1 keys
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJ = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = F.gelu(self.c_fc(x), approximate="tanh")  # GPT-2 was trained with GELU's tanh form
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the output layer reuses the token embedding matrix (as GPT-2 does), so the
        # logit of token i is the dot product of the final hidden state with token i's embedding.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "RESIDUAL_PROJ", False):
                # Each block adds two projections into the residual stream; scaling their init by
                # 1/sqrt(2 * n_layer) keeps the stream's variance from growing with depth (GPT-2
                # paper).
                std = std / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def configure_optimizer(self, lr, weight_decay, device):
        """AdamW (betas 0.9, 0.95, as GPT-2 and nanoGPT), with weight decay on the matrices only:
        not on biases and LayerNorm gains, which decay would pull toward 0 for no benefit."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused_adamw(device))

    def num_params(self, embeddings=True):
        """Parameter count (the tied lm_head counted once); without the token and position
        embeddings if asked."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def hidden(self, idx, kv_cache=None):
        """The final hidden states (B, T, n_embd) after ln_f; forward() turns them into logits."""
        B, T = idx.size()
        past = kv_cache.pos if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than the context "
                             f"({self.config.block_size})")
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, kv_cache=None):
        """idx (B, T) token ids -> (logits (B, T, vocab), loss).

        targets[:, t] is the token that follows idx[:, t]; positions with target -100 (padding) are
        left out of the loss. With a kv_cache, idx continues the cached sequence.
        """
        logits = self.lm_head(self.hidden(idx, kv_cache))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-100)
        return logits, loss


def lr_at(step, total, warmup, lr, min_lr):
    """Linear warmup to lr over `warmup` steps, then cosine decay to min_lr at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def logits_fp32(model, x, positions=None):
    """model(x)'s logits (B, T, vocab) in float32 whatever the autocast dtype: the transformer body
    may run in bf16/fp16, the output layer (and so every logit) is computed in float32 (in float64
    for a float64 model: never less precise than the model). positions, a (B, T) bool mask: only
    those positions' logits, (n, vocab) (the output layer is most of a small model's work)."""
    h = model.hidden(x)  # (B, T, C)
    if positions is not None:
        h = h[positions]  # (n, C)
    dtype = torch.promote_types(h.dtype, torch.float32)
    # autocast switched off where it may be on: the course autocasts on CUDA and CPUs only (torch
    # before 2.5 refuses even torch.autocast("mps", enabled=False))
    off = (torch.autocast(device_type=h.device.type, enabled=False)
           if h.device.type in ("cuda", "cpu") else nullcontext())
    with off:
        return F.linear(h.to(dtype), model.lm_head.weight.to(dtype))  # (B, T, vocab)


def fused_adamw(device):
    """Whether AdamW can update every parameter in one fused kernel: on CUDA, and on the CPU from
    torch 2.4 (a 2-core CPU, the 6/512 student: 43 ms a step against 137 ms for the loop)."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    kind = str(device).split(":")[0]
    return kind == "cuda" or (kind == "cpu" and (major, minor) >= (2, 4))
