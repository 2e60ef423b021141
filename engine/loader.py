"""Checkpoint tensors streamed one by one into the model, quantized as they arrive.

Sources: a GGUF file (tensors dequantized by the gguf package, renamed to Hugging Face names,
q/k rows un-permuted; or, with `quant="gguf"`, its Q4_0/Q4_1/Q8_0 blocks repacked as they
are, engine/quant/gguf.py) or a Hugging Face directory of safetensors. Only one fused weight is held
in 16/32-bit at any time; a 7B model never needs a second full-precision copy in memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from engine.config import ModelConfig, QuantPolicy, QuantSpec
from engine.errors import CheckpointError
from engine.layers.linear import QuantLinear
from engine.models.llama import LlamaModel
from engine.progress import progress_bar

log = logging.getLogger("nibble.loader")

SUPPORTED_ARCHS = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
}
GGUF_ARCHS = ("llama", "mistral", "qwen2", "qwen3")

# GGUF tensor names -> Hugging Face names (blk.N. prefixes handled separately).
_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_GGUF_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


# ----------------------------------------------------------------------------- configs

def config_from_hf(path: Path) -> ModelConfig:
    data = json.loads((path / "config.json").read_text())
    archs = data.get("architectures") or []
    arch = next((SUPPORTED_ARCHS[a] for a in archs if a in SUPPORTED_ARCHS), None)
    if arch is None:
        raise CheckpointError(f"{path}: architecture {archs} is not supported; nibble runs "
                              f"{', '.join(SUPPORTED_ARCHS)}")
    heads = data["num_attention_heads"]
    eos = data.get("eos_token_id")
    rope = data.get("rope_scaling") or data.get("rope_parameters") or {}
    theta = data.get("rope_theta", rope.get("rope_theta", 10000.0))
    return ModelConfig(
        arch=arch, vocab_size=data["vocab_size"], hidden_size=data["hidden_size"],
        intermediate_size=data["intermediate_size"], num_layers=data["num_hidden_layers"],
        num_heads=heads, num_kv_heads=data.get("num_key_value_heads", heads),
        head_dim=data.get("head_dim") or data["hidden_size"] // heads,
        rms_norm_eps=data.get("rms_norm_eps", 1e-5), rope_theta=float(theta),
        rope_scaling=_rope_items(rope),
        max_position_embeddings=data.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(data.get("attention_bias", False)),
        qk_norm=arch == "qwen3", bos_token_id=data.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
    )


def _rope_items(rope: dict) -> tuple:
    items = {k: v for k, v in rope.items() if k != "rope_theta"}
    if items.get("rope_type", items.get("type")) in (None, "default"):
        return ()
    return tuple(sorted(items.items()))


def config_from_gguf(reader) -> ModelConfig:
    f = _gguf_fields(reader)
    arch = f.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported; nibble runs {GGUF_ARCHS}")

    def key(name, default=None):
        value = f.get(f"{arch}.{name}", default)
        if value is None:
            raise CheckpointError(f"GGUF file lacks the metadata key {arch}.{name}")
        return value

    names = {t.name for t in reader.tensors}
    heads, hidden = int(key("attention.head_count")), int(key("embedding_length"))
    vocab = f.get(f"{arch}.vocab_size") or len(f.get("tokenizer.ggml.tokens", []))
    eos = f.get("tokenizer.ggml.eos_token_id")
    scaling = ()
    if f.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = (("factor", float(f[f"{arch}.rope.scaling.factor"])), ("rope_type", "linear"))
    return ModelConfig(
        arch=arch, vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")), num_layers=int(key("block_count")),
        num_heads=heads, num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(f.get(f"{arch}.attention.key_length", hidden // heads)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names, qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
    )


def _gguf_fields(reader) -> dict:
    out = {}
    for name, field in reader.fields.items():
        if name in ("tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            continue
        try:
            out[name] = field.contents()
        except Exception:  # noqa: BLE001 - an odd field we don't need must not stop loading
            continue
    return out


# ----------------------------------------------------------------------------- tensors

def open_gguf(path: Path):
    """A GGUFReader, parsed once per file version while it is kept (see reader_cache): the
    gguf package reads the metadata (the tokenizer's 49k-entry vocabulary and merges) field by
    field, which takes seconds, and a server with variants or a comparison opens one file
    several times."""
    st = Path(path).stat()
    return _reader(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


# Open reader_cache blocks: while any is open, parsed GGUF files stay parsed.
_HOLDS = 0


@contextlib.contextmanager
def reader_cache():
    """Keeps parsed GGUF files for every load inside the block (a server's variants, the two
    sides of a comparison), so one file is parsed once; when the last block closes they are
    let go as after a single load (release_load_memory)."""
    global _HOLDS
    _HOLDS += 1
    try:
        yield
    finally:
        _HOLDS -= 1
        release_load_memory()


def release_load_memory() -> None:
    """After loading, unless a reader_cache block is open: drops the parsed GGUF readers and
    hands the heap that loading freed back to the system. A parsed reader keeps the file
    mapped and one Python object per metadata field: on a 2-core AMD EPYC with the default
    model (int4), dropping it took the process from 746 to 522 MB resident, and trimming the
    heap (glibc's malloc_trim: the loader's transient fp32 copies leave it fragmented) to 414
    MB. Parsing the file again costs about 3 s, hence the cache while loads follow each other."""
    if _HOLDS:
        return
    _reader.cache_clear()
    gc.collect()  # the readers' fields are in reference cycles
    _malloc_trim()


@functools.cache
def _libc():
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # glibc; musl has none


def _malloc_trim() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=4)
def _reader(path: str, size: int, mtime_ns: int):
    import gguf

    del size, mtime_ns  # part of the cache key only
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise CheckpointError(f"{path} is not a readable GGUF file ({exc}); it may be truncated "
                              f"or corrupt. Download it again.") from None


def gguf_tensors(reader, cfg: ModelConfig) -> Iterator[tuple[str, Tensor]]:
    """(Hugging Face name, float32 tensor) for each tensor of a GGUF file."""
    for t in reader.tensors:
        name = gguf_to_hf_name(t.name)
        if name is not None:
            yield name, _gguf_float(t, name, cfg)


def _gguf_float(t, name: str, cfg: ModelConfig) -> Tensor:
    """One GGUF tensor dequantized exactly by the gguf package, as float32 in HF layout."""
    from gguf.quants import dequantize

    try:
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), copy=True))
    except (ValueError, NotImplementedError) as exc:
        raise CheckpointError(f"cannot read GGUF tensor {t.name} ({t.tensor_type.name}): {exc}") from None
    w = w.float().reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
    return _unpermute(w, name, cfg)


def _unpermute(w: Tensor, name: str, cfg: ModelConfig) -> Tensor:
    """q/k rows back from llama.cpp's order (llama and mistral files only); any row-major
    tensor works, packed codes and per-row scales included."""
    if cfg.arch in ("llama", "mistral") and name.endswith(("q_proj.weight", "k_proj.weight")):
        return unpermute_rows(w, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
    return w


def _gguf_linear_types(reader) -> dict[str, list[str]]:
    """Our module path -> the GGUF type of each of its weight shards, in shard order."""
    shards: dict[str, dict[int, str]] = {}
    for t in reader.tensors:
        name = gguf_to_hf_name(t.name)
        target = route(name) if name else None
        if target is None or target[1] != "weight" or target[2] is None:
            continue
        shards.setdefault(target[0], {})[target[2]] = t.tensor_type.name
    return {m: [types[i] for i in sorted(types)] for m, types in shards.items()}


def gguf_policy(reader, base: QuantPolicy, tied: bool) -> tuple[QuantPolicy, frozenset[str]]:
    """`quant="gguf"`: each linear module in the format its blocks fit (engine/quant/gguf.py
    native_spec), after the user's own rules (`base.rules`, which win); returns the policy and
    the modules whose blocks are repacked as they are. A tied lm_head stays with the 16-bit
    embedding."""
    from engine.quant.gguf import native_spec

    fits = {}  # module -> (the format its blocks fit, whether they repack as they are)
    for module, types in _gguf_linear_types(reader).items():
        spec, repacked = native_spec(types)
        if spec is not None and not (module == "lm_head" and tied):
            fits[module] = (spec, repacked)
    file_rules = tuple((f"^{re.escape(m)}$", spec) for m, (spec, _) in fits.items())
    counts: dict[str, int] = {}
    for spec, repacked in fits.values():
        key = f"{spec}{'' if repacked else ' requantized'}"
        counts[key] = counts.get(key, 0) + 1
    label = "gguf (" + ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())) + ")"
    if base.rules:
        label += " with " + ",".join(f"{p}={s}" for p, s in base.rules)
    policy = QuantPolicy(QuantSpec(base.float_name), base.rules + file_rules, label)
    # a user's rule may pick another format: that module then loads through the float path
    native = {m for m, (spec, repacked) in fits.items() if repacked and policy.spec_for(m) == spec}
    return policy, frozenset(native)


def load_gguf_native(model: LlamaModel, reader, native: frozenset[str],
                     progress: bool = True) -> None:
    """Streams a GGUF file into `model`: the shards of `native` modules go in as repacked
    blocks (no float copy), every other tensor through its exact dequantization."""
    from engine.quant.gguf import convert

    modules = dict(model.named_modules())
    cfg = model.config
    inexact = total_blocks = 0

    def floats() -> Iterator[tuple[str, Tensor]]:
        nonlocal inexact, total_blocks
        for t in progress_bar(reader.tensors, total=len(reader.tensors), desc="loading",
                              unit="tensor", enabled=progress):
            name = gguf_to_hf_name(t.name)
            target = route(name) if name else None
            if target is None or target[0] not in native or target[1] != "weight":
                if name is not None:
                    yield name, _gguf_float(t, name, cfg)
                continue
            module = modules[target[0]]
            rows, cols = int(t.shape[1]), int(t.shape[0])
            try:
                stored, bad = convert(t.tensor_type.name, t.data, rows, cols, module.spec)
            except ValueError as exc:
                raise CheckpointError(f"GGUF tensor {t.name}: {exc}") from None
            inexact, total_blocks = inexact + bad, total_blocks + stored["scales"].numel()
            module.load_stored_shard(target[2], {k: _unpermute(v, name, cfg) for k, v in stored.items()})

    load_weights(model, floats(), len(reader.tensors), progress=False)
    if inexact:
        log.warning("%d of %d GGUF blocks have a zero point (m + 8d) that float32 cannot hold "
                    "exactly: their weights differ from the gguf dequantization by half an ulp",
                    inexact, total_blocks)


def gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _GGUF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER[m.group(2)]}.{m.group(3)}"
    return None  # rope_freqs and other tensors that carry no weight of ours


def unpermute_rows(w: Tensor, heads: int) -> Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved rotary -> rotate-half layout)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def safetensors_tensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, f.get_tensor(name)


# ----------------------------------------------------------------------------- routing

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
SHARDS = {"self_attn.q_proj": ("self_attn.qkv_proj", 0), "self_attn.k_proj": ("self_attn.qkv_proj", 1),
           "self_attn.v_proj": ("self_attn.qkv_proj", 2), "self_attn.o_proj": ("self_attn.o_proj", 0),
           "mlp.gate_proj": ("mlp.gate_up_proj", 0), "mlp.up_proj": ("mlp.gate_up_proj", 1),
           "mlp.down_proj": ("mlp.down_proj", 0)}


def route(name: str) -> tuple[str, str, int | None] | None:
    """HF tensor name -> (our module path, 'weight'|'bias', shard or None for plain params)."""
    if name == "model.embed_tokens.weight":
        return "embed_tokens", "weight", None
    if name == "model.norm.weight":
        return "norm", "weight", None
    if name == "lm_head.weight":
        return "lm_head", "weight", 0
    m = _LAYER_RE.fullmatch(name)
    if not m:
        return None
    layer, part, kind = m.groups()
    if part in SHARDS:
        module, shard = SHARDS[part]
        return f"layers.{layer}.{module}", kind, shard
    return f"layers.{layer}.{part}", kind, None


def load_weights(model: LlamaModel, tensors: Iterator[tuple[str, Tensor]], total: int,
                 progress: bool = True, check: bool = True) -> None:
    """Streams ``tensors`` into ``model``, quantizing each linear layer as it completes;
    ``check``: fail unless every weight arrived."""
    modules = dict(model.named_modules())
    tie = model.config.tie_word_embeddings
    for name, w in progress_bar(tensors, total=total, desc="loading", unit="tensor", enabled=progress):
        target = route(name)
        if target is None:
            continue
        path, kind, shard = target
        module = modules.get(path)
        if module is None:
            raise CheckpointError(f"checkpoint tensor {name} has no place in the model ({path})")
        if shard is None:
            set_param(module, kind, w, name)
        else:
            module.load_shard(kind, shard, w)
        if tie and path == "embed_tokens":
            # Same dtype and layout: the 16-bit lm_head shares the embedding's storage.
            model.lm_head.load_shard("weight", 0, model.embed_tokens.weight.data)
    if check:
        check_complete(model)


def set_param(module, kind: str, w: Tensor, name: str) -> None:
    """Fills an unquantized parameter (embedding, norm) in its own dtype; marks it loaded."""
    param = getattr(module, kind)
    if tuple(param.shape) != tuple(w.shape):
        raise CheckpointError(f"{name} has shape {tuple(w.shape)}, the model expects {tuple(param.shape)}")
    param.data = w.to(param.dtype).contiguous()
    module._loaded = True


def check_complete(model: LlamaModel) -> None:
    missing = [n for n, m in model.quant_linears().items() if not m.loaded]
    missing += [n for n, m in model.named_modules()
                if hasattr(m, "weight") and not isinstance(m, QuantLinear) and not getattr(m, "_loaded", False)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint is missing weights for {shown}")
