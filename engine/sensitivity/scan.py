"""Sensitivity scan: what quantizing one linear module alone costs in KL divergence against the
16-bit model, and what it saves in weight bytes, for every module and candidate format.

One reference stays loaded: an LLM in fp32, which holds a 16-bit checkpoint's weights exactly
(bf16 matmuls are emulated on CPUs without bf16 units, ~5x slower). For each module and format
the module's method is swapped in place for one that holds its weight as the format stores it
(quantized, then dequantized: see _candidate), the calibration chunks are scored
teacher-forced as `nibble compare` scores them (the second half of each chunk), and the
original method is swapped back. The reference pass keeps every layer's input, so a module of
layer i replays layers i.. only, and lm_head only itself: half the layers of a full forward on
average.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from engine.config import QuantPolicy, QuantSpec
from engine.errors import ConfigError
from engine.eval import stats
from engine.layers.linear import QuantLinear
from engine.models.llama import LlamaModel, residual_dtype_for
from engine.progress import counter
from engine.quant import StoredMethod, make_method
from engine.sensitivity.reference import BLOCK, Reference
from engine.sensitivity.results import WIDE, ModuleScan, Option, Scan

WIDE_BYTES = 2  # per value of WIDE


def module_groups(model: LlamaModel) -> list[str]:
    """The scanned modules, the names `--rule` regexes match: per layer qkv_proj, o_proj,
    gate_up_proj, down_proj, then lm_head."""
    return list(model.quant_linears())


def layer_of(model: LlamaModel, name: str) -> int:
    """The first layer a change to module `name` reaches; lm_head: past the last one."""
    m = re.match(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else len(model.layers)


def fixed_bytes(model: LlamaModel, device: torch.device) -> int:
    """Weight bytes outside the linear modules (embeddings, norms) as a plan's model holds them
    on `device`, whatever width the reference holds them in: the parameters of the same model
    built with a 16-bit policy and never loaded (its embedding is address space nothing
    touches; engine/plan.py builds its models so too). On CPU the norms stay fp32 with the
    residual stream (engine/models/llama.py residual_dtype_for)."""
    policy = QuantPolicy.build(WIDE)
    served = LlamaModel(model.config, policy, BLOCK, residual_dtype_for(policy.act_dtype, device))
    return sum(p.numel() * p.element_size() for p in served.parameters())


def wide_bytes(model: LlamaModel, lin: QuantLinear) -> int:
    """A module's bytes at 16 bits, as `nibble inspect` counts them: 0 for an lm_head that
    shares the embedding's storage (quantizing it adds bytes)."""
    if lin is model.lm_head and model.lm_head_shares_embedding():
        return 0
    return (lin.out_features * lin.in_features + _bias_numel(lin)) * WIDE_BYTES


def _bias_numel(lin: QuantLinear) -> int:
    return lin.bias.numel() if lin.bias is not None else 0


# ------------------------------------------------------------------------------ the scan

def scan(llm, chunks: Sequence[Sequence[int]], formats: Sequence[str], progress: bool = True,
         batch_tokens: int = 2048, calibration: str = "") -> Scan:
    """Every module of `llm` (an engine.LLM loaded 16/32-bit, best quant="fp32") quantized alone
    to each of `formats`, scored on `chunks` (token lists, e.g. engine.eval.texts
    corpus_chunks of calibration_text). `calibration` names the text in the report."""
    start = time.perf_counter()
    specs = _candidate_specs(formats)
    longest = max(map(len, chunks), default=0)
    if not 2 <= longest <= llm.loaded.max_model_len:
        raise ConfigError(f"calibration chunks of {longest} tokens: give chunks of 2 to "
                          f"{llm.loaded.max_model_len} tokens (the reference's max_model_len)")
    model: LlamaModel = llm.model
    device, batch_invariant = torch.device(llm.config.device), llm.config.batch_invariant
    linears = model.quant_linears()
    weights = {name: _float_weight(name, lin) for name, lin in linears.items()}
    widths = {name: wide_bytes(model, lin) for name, lin in linears.items()}
    out = []
    with torch.inference_mode(), counter(len(linears) * len(specs), desc="scanning",
                                         unit="eval", enabled=progress) as bar:
        ref = Reference(model, chunks, batch_tokens)
        for name, lin in linears.items():
            options = []
            for spec in specs:
                dense, nbytes = _candidate(lin, weights[name], spec, device, batch_invariant)
                with _swapped(lin, dense):
                    means, sizes = ref.kld(layer_of(model, name))
                ci = stats.mean_ci95(means, sizes) if len(means) > 1 else None
                options.append(Option(str(spec), float((means * sizes).sum() / sizes.sum()),
                                      nbytes, tuple(ci) if ci else None))
                bar.update(1)
            out.append(ModuleScan(name, widths[name], tuple(options)))
    scored = sum(p.rows.numel() for p in ref.passes)
    return Scan(llm.config.model, tuple(str(s) for s in specs), tuple(out),
                fixed_bytes(model, device), len(chunks), longest, scored,
                time.perf_counter() - start, calibration)


def _candidate_specs(formats: Sequence[str]) -> list[QuantSpec]:
    specs = [QuantSpec.parse(f) for f in formats]
    if not specs:
        raise ConfigError("give at least one format to scan, e.g. int4,int4-g32,int8,nf4")
    wide = [str(s) for s in specs if s.is_float]
    if wide:
        raise ConfigError(f"scan quantized formats only: {', '.join(wide)} is a float format "
                          f"(keeping a module {WIDE} is always an option of the plan)")
    return list(dict.fromkeys(specs))


def _float_weight(name: str, lin: QuantLinear) -> Tensor:
    """The reference module's weight [N, K] (its own storage for an fp32 reference)."""
    if not lin.spec.is_float:
        raise ConfigError(f"the scan's reference must be 16/32-bit, and {name} is {lin.spec}; "
                          "load the original model with quant='fp32'")
    try:
        return lin.method.dequantize()
    except RuntimeError:  # prepare let it go for fbgemm's packed copy
        raise ConfigError(f"{name}'s 16-bit weight was repacked for fbgemm at load; load the "
                          "reference with quant='fp32'") from None


def _candidate(lin: QuantLinear, weight: Tensor, spec: QuantSpec, device: torch.device,
               batch_invariant: bool) -> tuple[StoredMethod, int]:
    """(a method in the reference's float format holding `weight` as `spec` stores it, the
    bytes `spec` stores plus the bias at 16 bits). The weight is computed densely rather than
    by `spec`'s kernel: what a scan measures is the format's rounding, and the low-bit kernels
    with fp32 activations are no faster than the reference's GEMM, some much slower (int8's
    fused op took 1.6 s for a 512-row gate_up_proj of the default model where F.linear took
    0.04 s, 2-core AVX2 EPYC)."""
    method = make_method(spec, lin.in_features, lin.out_features, lin.act_dtype)
    method.load(method.quantize(weight))
    dense = make_method(lin.spec, lin.in_features, lin.out_features, lin.act_dtype)
    dense.load(dense.quantize(method.dequantize()))
    dense.prepare(device, batch_invariant)
    return dense, method.stored_bytes + _bias_numel(lin) * WIDE_BYTES


@contextmanager
def _swapped(lin: QuantLinear, method: StoredMethod) -> Iterator[None]:
    old, lin.method = lin.method, method
    try:
        yield
    finally:
        lin.method = old
