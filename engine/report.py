"""What a loaded model holds: each module's format and weight bytes, and which kernels serve it."""

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


KERNEL_ROWS = (1, 16, 512)  # a decode step of 1 and of 16 sequences, a prefill chunk


def kernel_report(model: LlamaModel) -> dict:
    """Which kernels a prepared model runs: whether a decode step is one fused native call (and
    with which activations), and per group of like layers the path a call of 1, 16 and 512
    rows takes (`kernel_path`; the fused step uses the native layout of the same weights)."""
    if model.native_decode is None:
        step = "per layer"
    else:
        acts = "int8" if model.native_decode_act8 else "fp32"
        step = f"fused native ({acts} activations)"
        if model.native_logits is not None and model.native_decode_act8:
            step += ", int8 lm_head on int8 activations"
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, lin in model.quant_linears().items():
        path = getattr(lin.method, "kernel_path", None)
        paths = tuple(path(m) if path else type(lin.method).__name__ for m in KERNEL_ROWS)
        groups[(re.sub(r"^layers\.\d+\.", "layers.*.", name), str(lin.spec), paths)].append(name)
    return {"decode_step": step,
            "layers": [{"modules": pattern, "format": fmt, "count": len(names),
                        **{f"rows_{m}": p for m, p in zip(KERNEL_ROWS, paths, strict=True)}}
                       for (pattern, fmt, paths), names in groups.items()]}
