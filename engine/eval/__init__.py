"""A/B comparison of two variants of a model: teacher-forced metrics, greedy agreement, cost,
reports and plots (compare.py), quality gates (gate.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from engine.config import EngineConfig
from engine.errors import ConfigError, NibbleError
from engine.eval.gate import parse_gate
from engine.eval.runner import CompareOptions, Comparison, compare, format_table

__all__ = ["CompareOptions", "Comparison", "compare", "format_table", "is_16bit", "parse_gate",
           "reference_config", "weights_key"]


def reference_config(cfg: EngineConfig) -> EngineConfig:
    """The 16-bit original of a variant: the same model in bf16; for a checkpoint saved by
    `nibble quantize`, the model it was quantized from (recorded in nibble_quant.json)."""
    from engine import hub
    from engine.checkpoint import read_quant_config

    source = hub.resolve_model(cfg.model, progress=False)
    model = cfg.model
    if source.kind == "nibble":
        recorded = read_quant_config(source.path).get("source")
        try:
            hub.resolve_model(recorded, progress=False)
        except (NibbleError, TypeError):
            raise ConfigError(f"{source.path} records its original model as {recorded!r}, which "
                              "cannot be found here; the 16-bit reference is unknown") from None
        model = recorded
    return dataclasses.replace(cfg, model=model, quant="bf16", rules=())


def weights_key(cfg: EngineConfig) -> tuple:
    """What decides a config's weights (model, format, rules, device); batching and cache sizes
    do not. Two configs with the same key can stand in for each other in a comparison."""
    return (cfg.model, cfg.quant or "bf16", tuple(cfg.rules), cfg.device)


def is_16bit(cfg: EngineConfig) -> bool:
    """True when every linear layer of this config stays 16-bit or wider (nothing to gate)."""
    if Path(cfg.model).expanduser().joinpath("nibble_quant.json").is_file():
        return False
    policy = cfg.policy
    return policy.default.is_float and all(spec.is_float for _, spec in policy.rules)
