"""What a loaded model holds: each module's format and weight bytes."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from engine.models.llama import LlamaModel


@dataclass(frozen=True)
class ModuleWeights:
    name: str
    format: str
    nbytes: int
    shared_with: str | None = None  # tied lm_head: its bytes are the embedding's


def module_weights(model: LlamaModel) -> list[ModuleWeights]:
    rows = []
    tied = model.lm_head_shares_embedding()
    for name, lin in model.quant_linears().items():
        if tied and lin is model.lm_head:
            rows.append(ModuleWeights(name, str(lin.spec), 0, "embed_tokens"))
            continue
        bias = lin.bias.numel() * lin.bias.element_size() if lin.bias is not None else 0
        rows.append(ModuleWeights(name, str(lin.spec), lin.method.stored_bytes + bias))
    for name, lin in model.quant_linears().items():
        if extra := getattr(lin.method, "extra_bytes", 0):
            rows.append(ModuleWeights(f"{name} (fp16 GEMM copy)", "fp16", extra))
    for name, param in model.named_parameters():
        fmt = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}[str(param.dtype)]
        rows.append(ModuleWeights(name.removesuffix(".weight"), fmt, param.numel() * param.element_size()))
    return rows


def total_bytes(model: LlamaModel) -> int:
    """Every byte of weights the model holds (walks every module)."""
    return sum(r.nbytes for r in module_weights(model))


def bytes_per_format(rows: list[ModuleWeights]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for r in rows:
        out[r.format] += r.nbytes
    return dict(out)


def collapse_layers(rows: list[ModuleWeights]) -> list[tuple[str, str, int, int]]:
    """Groups 'layers.N.x' rows that share a format: (pattern, format, count, bytes)."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in rows:
        groups[(re.sub(r"^layers\.\d+\.", "layers.*.", r.name), r.format)].append(r.nbytes)
    return [(name, fmt, len(b), sum(b)) for (name, fmt), b in groups.items()]
