"""From a model name to a loaded, prepared model: resolve, read config, stream weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine import hub
from engine.checkpoint import load_checkpoint, policy_from_checkpoint, read_quant_config
from engine.config import EngineConfig, ModelConfig, QuantPolicy
from engine.errors import ConfigError
from engine.loader import (
    config_from_gguf,
    config_from_hf,
    gguf_policy,
    gguf_tensors,
    load_gguf_native,
    load_weights,
    open_gguf,
    release_load_memory,
    safetensors_tensors,
)
from engine.models.llama import LlamaModel, residual_dtype_for
from engine.prequantized import PrequantizedFormat, load_prequantized
from engine.tokenizer import load_tokenizer

DEFAULT_MAX_LEN = 8192  # KV cache size grows with it; --max-model-len raises it


@dataclass
class Loaded:
    model: LlamaModel
    tokenizer: object
    config: ModelConfig
    policy: QuantPolicy
    source: hub.ModelSource
    max_model_len: int


def load(cfg: EngineConfig, progress: bool = True, prepare: bool = True) -> Loaded:
    """Loads ``cfg.model`` with its policy; ``prepare`` repacks for the device's kernels
    (leave it off to save a checkpoint: prepared layouts are kernel-specific)."""
    source = hub.resolve_model(cfg.model, progress=progress)
    model_cfg, policy, fill = _open(source, cfg, progress)
    max_len = _max_len(cfg, model_cfg, source)
    model = LlamaModel(model_cfg, policy, max_len,
                       residual_dtype_for(policy.act_dtype, torch.device(cfg.device)))
    fill(model)
    tokenizer = load_tokenizer("gguf" if source.kind == "gguf" else "hf", source.path)
    if prepare:
        model.prepare(torch.device(cfg.device), cfg.batch_invariant,
                      decode_act8=cfg.decode_activations == "int8")
    del fill  # it holds the file's reader
    release_load_memory()
    return Loaded(model, tokenizer, model_cfg, policy, source, max_len)


def describe(cfg: EngineConfig) -> tuple[hub.ModelSource, ModelConfig, QuantPolicy, int]:
    """What `load` would build (source, model config, policy, context length), from the
    config and file headers only: no weight is read."""
    source = hub.resolve_model(cfg.model, progress=False)
    model_cfg, policy, _ = _open(source, cfg, progress=False)
    return source, model_cfg, policy, _max_len(cfg, model_cfg, source)


def _max_len(cfg: EngineConfig, model_cfg: ModelConfig, source: hub.ModelSource) -> int:
    max_len = cfg.max_model_len or min(model_cfg.max_position_embeddings, DEFAULT_MAX_LEN)
    if max_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"max_model_len {max_len} exceeds the context length "
                          f"{model_cfg.max_position_embeddings} of {source.name}")
    return max_len


def _open(source: hub.ModelSource, cfg: EngineConfig, progress: bool):
    """-> (model config, policy, function that streams the weights into a model)."""
    if source.kind == "gguf":
        reader = open_gguf(source.path)
        mc = config_from_gguf(reader)
        if cfg.gguf_native:  # the file's own blocks: its types pick each module's format
            policy, native = gguf_policy(reader, cfg.policy, mc.tie_word_embeddings)
            return mc, policy, lambda m: load_gguf_native(m, reader, native, progress)
        return mc, cfg.policy, lambda m: load_weights(
            m, gguf_tensors(reader, mc), len(reader.tensors), progress)
    if cfg.gguf_native:
        raise ConfigError(f"--quant gguf serves a GGUF file on its own blocks, and {source.name} "
                          f"is a {source.kind} checkpoint; pick another --quant (e.g. int4)")
    mc = config_from_hf(source.path)
    if source.kind == "nibble":
        data = read_quant_config(source.path)
        if cfg.quant or cfg.rules:
            raise ConfigError(f"{source.path} is already quantized ({data['policy']}); "
                              f"load it without --quant and --rule")
        return mc, policy_from_checkpoint(data, data["float"]), lambda m: load_checkpoint(
            m, source.path, progress)
    total = _count_tensors(source.path)
    fmt = PrequantizedFormat.read(source.path)
    if fmt is not None:  # GPTQ / AWQ: the files say which modules are quantized, and how
        if cfg.quant or cfg.rules:
            raise ConfigError(f"{source.path} is already quantized ({fmt.method.upper()}); load it "
                              "without --quant and --rule")
        policy = fmt.policy(source.path, cfg.policy.float_name)
        return mc, policy, lambda m: load_prequantized(
            m, source.path, fmt, safetensors_tensors(source.path), total, progress)
    return mc, cfg.policy, lambda m: load_weights(m, safetensors_tensors(source.path), total, progress)


def _count_tensors(path: Path) -> int:
    from safetensors import safe_open

    n = 0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            n += len(list(f.keys()))
    return n
