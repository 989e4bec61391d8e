"""Loading OpenAI's GPT-2 weights into our GPT, from the files people actually meet.

Accepted: a folder with config.json plus model.safetensors or pytorch_model.bin (the hub layout of
openai-community/gpt2, or what transformers' save_pretrained writes), or a single weights file.
(common/plumbing/download.py fetches them from the Hugging Face hub.)
"""
import json
import mmap
import os
import re

import torch

from common.model import GPTConfig

SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


class CheckpointError(ValueError):
    """A file that is not the GPT-2 checkpoint it should be: the message says what is wrong."""

    def _render_traceback_(self):  # IPython's hook: in a notebook cell, this line, not a traceback
        return [f"error: {self}"]


# GPT-2 was written in TensorFlow with "Conv1D" layers that store weights as (in, out); nn.Linear
# stores (out, in) and computes x @ W.T. So these four matrices are transposed on the way in.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BLOCK_KEYS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
              "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
              "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")

# --- reading a safetensors file by hand ---
# Layout: 8 bytes (little-endian u64) = N, then N bytes of JSON saying, for each tensor, its dtype,
# shape and [begin, end) byte range in the raw data that follows. We memory-map the file, so a
# tensor's bytes are read from disk only when used.
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
             "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
             "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise CheckpointError(f"{path} is not a safetensors file: only {size} bytes")
        # copy-on-write: torch wants a writable buffer
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    n = int.from_bytes(buf[:8], "little")
    if n > size - 8:
        raise CheckpointError(f"{path} is not a valid safetensors file: header of {n:,} bytes in a "
                              f"{size:,}-byte file")
    try:
        header = json.loads(bytes(buf[8:8 + n]))
        assert isinstance(header, dict)
    except (ValueError, AssertionError):
        raise CheckpointError(f"{path} is not a valid safetensors file: its header is not "
                              f"JSON") from None
    header.pop("__metadata__", None)
    data_start, tensors = 8 + n, {}
    for name, info in header.items():
        try:
            dtype = ST_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} is not a valid safetensors file: bad header entry for "
                                  f"{name}") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or data_start + end > size or begin < 0:
            raise CheckpointError(f"{path} is truncated or corrupt: tensor {name} lies outside the "
                                  f"file")
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            flat = torch.frombuffer(buf, dtype=dtype, count=numel, offset=data_start + begin)
            tensors[name] = flat.view(shape)
    return tensors


def read_weights_file(path):
    """A dict name -> tensor from a .safetensors or a PyTorch (.bin/.pt) file."""
    with open(path, "rb") as f:
        head = f.read(9)
    if path.endswith(".safetensors") or head[8:9] == b"{":
        return read_safetensors(path)
    try:
        # weights_only: never run pickled code
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise CheckpointError(f"{path} is not a GPT-2 checkpoint (not safetensors, and PyTorch "
                              f"cannot load it)") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a GPT-2 checkpoint: it does not hold a dict of "
                              f"tensors")
    return sd


# --- from a checkpoint's names to ours ---

def config_from_json(path):
    with open(path) as f:
        c = json.load(f)
    if c.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{path} describes a {c['model_type']!r} model, not GPT-2")
    try:
        return GPTConfig(block_size=c.get("n_positions", c.get("n_ctx")),
                         vocab_size=c["vocab_size"], n_layer=c["n_layer"], n_head=c["n_head"],
                         n_embd=c["n_embd"],
                         layer_norm_eps=c.get("layer_norm_epsilon", 1e-5))
    except KeyError as e:
        raise CheckpointError(f"{path} lacks {e.args[0]}, so it is not a GPT-2 config") from None


def infer_config(sd, path):
    """Shapes from the tensors themselves; every GPT-2 size uses 64-wide heads."""
    if "wte.weight" not in sd or "wpe.weight" not in sd:
        missing = [k for k in ("wte.weight", "wpe.weight") if k not in sd]
        raise CheckpointError(f"{path} is not a GPT-2 checkpoint: missing {', '.join(missing)}")
    vocab, n_embd = sd["wte.weight"].shape
    layers = {int(m.group(1)) for k in sd for m in [re.match(r"h\.(\d+)\.", k)] if m}
    if n_embd % 64:
        raise CheckpointError(f"{path}: width {n_embd} is not a multiple of 64, so the number of "
                              f"heads cannot be inferred; pass a folder that holds its config.json")
    return GPTConfig(block_size=sd["wpe.weight"].shape[0], vocab_size=vocab,
                     n_layer=max(layers, default=-1) + 1, n_head=n_embd // 64, n_embd=n_embd)


def strip_names(sd):
    """Hub files name tensors 'h.0...'; save_pretrained writes 'transformer.h.0...'. Drop the prefix
    and the causal-mask buffers (attn.bias, attn.masked_bias) that old checkpoints carry: they are
    not weights, our attention builds its mask itself."""
    out = {}
    for k, v in sd.items():
        k = k[len("transformer."):] if k.startswith("transformer.") else k
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue
        out[k] = v
    return out


def convert(sd, config, path):
    """Our GPT's state_dict from GPT-2 tensors, with every key and shape checked."""
    C, V = config.n_embd, config.vocab_size
    lm_head = sd.pop("lm_head.weight", None)
    if lm_head is not None and "wte.weight" in sd and not torch.equal(lm_head, sd["wte.weight"]):
        raise CheckpointError(f"{path}: lm_head.weight differs from wte.weight; GPT-2 ties them, "
                              f"so this is not GPT-2")
    expected = {"wte.weight": (V, C), "wpe.weight": (config.block_size, C), "ln_f.weight": (C,),
                "ln_f.bias": (C,)}
    shapes = {"ln_1.weight": (C,), "ln_1.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
              "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
              "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "mlp.c_fc.weight": (C, 4 * C),
              "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,)}
    for i in range(config.n_layer):
        for k in BLOCK_KEYS:
            expected[f"h.{i}.{k}"] = shapes[k]
    missing = [k for k in expected if k not in sd]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{path} is not a complete GPT-2 checkpoint: missing "
                              f"{', '.join(missing[:5])}{more}")
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise CheckpointError(f"{path} does not match a {config.n_layer}-layer GPT-2: unexpected "
                              f"{', '.join(unexpected[:5])}")
    out = {}
    for k, shape in expected.items():
        t = sd[k]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(t.shape)}, expected {shape}")
        t = t.float()
        if k.endswith(CONV1D):
            t = t.t()  # Conv1D (in, out) -> Linear (out, in)
        out["transformer." + k] = t.contiguous()
    out["lm_head.weight"] = out["transformer.wte.weight"]  # tied
    return out


def load_gpt2(path):
    """(GPTConfig, state_dict) from a folder or a weights file (with config.json, if beside it)."""
    if os.path.isdir(path):
        folder = path
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                weights = os.path.join(path, name)
                break
        else:
            raise CheckpointError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
    elif os.path.isfile(path):
        folder, weights = os.path.dirname(path) or ".", path
    else:
        raise CheckpointError(f"{path} does not exist: pass a GPT-2 folder or weights file to "
                              f"--weights")
    sd = strip_names(read_weights_file(weights))
    cfg_file = os.path.join(folder, "config.json")
    config = config_from_json(cfg_file) if os.path.exists(cfg_file) else infer_config(sd, weights)
    return config, convert(sd, config, weights)
