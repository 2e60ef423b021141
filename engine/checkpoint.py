"""nibble's own pre-quantized checkpoint: safetensors + a JSON quant config.

Layout of a checkpoint directory:
  config.json          the model's shapes, in Hugging Face's schema
  nibble_quant.json    {"format": "nibble", "version": 1, "policy": ..., "modules": {name: cfg}}
  model.safetensors    "<module>.<tensor>" for every stored tensor (qweight, scales, ...),
                       "<module>.bias", "<module>.input_perm" (act-order GPTQ's column
                       order), and the 16-bit embeddings and norms
  tokenizer files      as transformers saves them
Loading gives bit-identical packed weights without quantizing again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from torch import Tensor

from engine.config import ModelConfig, QuantPolicy, QuantSpec
from engine.errors import CheckpointError
from engine.loader import set_param
from engine.models.llama import LlamaModel
from engine.progress import progress_bar

QUANT_FILE = "nibble_quant.json"
FORMAT_VERSION = 1
_HF_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def hf_config_dict(cfg: ModelConfig) -> dict:
    eos = list(cfg.eos_token_ids)
    return {
        "architectures": [_HF_ARCH[cfg.arch]], "model_type": cfg.arch,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) or None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings, "attention_bias": cfg.attention_bias,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
    }


def save_checkpoint(model: LlamaModel, tokenizer, out_dir: Path, source: str) -> Path:
    """Writes the loaded (not yet prepared) model to ``out_dir``."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    modules: dict[str, dict] = {}
    for name, lin in model.quant_linears().items():
        if name == "lm_head" and model.lm_head_shares_embedding():
            continue  # tied: rebuilt from the embedding on load
        stored = lin.method.require_stored()
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in stored.items()})
        if lin.bias is not None:
            tensors[f"{name}.bias"] = lin.bias.contiguous()
        if lin.input_perm is not None:
            tensors[f"{name}.input_perm"] = lin.input_perm.contiguous()
        modules[name] = lin.method.config()
    for name, param in model.named_parameters():
        tensors[name] = param.data.contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config_dict(model.config), indent=2))
    quant = {"format": "nibble", "version": FORMAT_VERSION, "source": source,
             "policy": model.policy.describe(), "float": model.policy.float_name,
             "modules": modules}
    (out_dir / QUANT_FILE).write_text(json.dumps(quant, indent=2))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def read_quant_config(path: Path) -> dict:
    try:
        data = json.loads((path / QUANT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path / QUANT_FILE}: {exc}") from None
    if data.get("format") != "nibble" or data.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / QUANT_FILE} is not a nibble v{FORMAT_VERSION} quant config")
    return data


def policy_from_checkpoint(data: dict, float_name: str) -> QuantPolicy:
    """Exact per-module rules, so every layer gets the format it was saved in."""
    rules = tuple((f"^{re.escape(name)}$", QuantSpec.parse(cfg["format"]))
                  for name, cfg in data["modules"].items())
    return QuantPolicy(QuantSpec.parse(float_name), rules)


def load_checkpoint(model: LlamaModel, path: Path, progress: bool = True) -> None:
    from safetensors import safe_open

    linears = model.quant_linears()
    params = dict(model.named_parameters())
    pending: dict[str, dict[str, Tensor]] = {}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        for key in progress_bar(keys, desc="loading", unit="tensor", enabled=progress):
            tensor = f.get_tensor(key)
            if key in params:
                module, _, kind = key.rpartition(".")
                set_param(model.get_submodule(module), kind, tensor, key)
                continue
            module, _, part = key.rpartition(".")
            if module not in linears:
                raise CheckpointError(f"{path}: tensor {key} matches no module of the model")
            pending.setdefault(module, {})[part] = tensor
    for name, tensors in pending.items():
        bias, perm = tensors.pop("bias", None), tensors.pop("input_perm", None)
        linears[name].load_quantized(tensors, bias, perm)
    if model.config.tie_word_embeddings and "lm_head" not in pending:
        model.lm_head.load_shard("weight", 0, model.embed_tokens.weight.data)
