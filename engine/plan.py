"""Will it fit? The memory a model needs under a quantization, before any weight is read.

From the model's config and file headers (engine/build.py's `describe`) the model's modules
are built without weights, which gives each its shape and storage format; each part is then
counted the way the engine will hold it:

- weights: the stored bytes, as `nibble inspect` counts them (a tied 16-bit lm_head shares
  the embedding's);
- kernel layouts: what the device's kernels keep instead of (or beside) the stored tensors:
  on CPU nibble's int4 layout with fp32 scales, nf4 dequantized to 16-bit, fbgemm's fp16
  copy of 16-bit layers where this machine chose it; on CUDA the Triton layouts (each
  format's `cpu_bytes` and `triton_bytes`, kernels/formats.py);
- the KV cache for `concurrency` sequences of the context length (cfg.max_model_len);
- workspace: the activations of the largest forward pass (`max_num_batched_tokens` rows), its
  logits, and the per-shape buffers of the dequantize-per-call path;
- runtime: the tokenizer, the rotary tables and the heap a loaded engine keeps (RUNTIME_*
  below, measured).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch

from engine.config import FLOAT_FORMATS, EngineConfig, ModelConfig, QuantPolicy, QuantSpec
from engine.errors import ConfigError
from engine.machine import device_memory

# What a loaded engine keeps beside its tensors, measured as the resident growth of a load
# minus every tensor this module counts (benchmarks/load_memory.py): the tokenizer, which grows
# with its vocabulary (Hugging Face's fast tokenizer keeps every token and merge in a few maps:
# 44.5 MiB for the default model's 49152 tokens), and a fixed part (libraries imported while
# loading, module objects, heap the allocator keeps: 18.0-20.9 MiB over bf16, int8, int4 and
# nf4 loads, with and without load-time tuning). 2 cores of an AMD EPYC, torch 2.13.
RUNTIME_FIXED = 20 * 2**20
RUNTIME_PER_TOKEN = 950
# A CUDA context (the driver's code and state on the GPU) before any tensor is allocated: an
# allowance, not a measurement (no GPU has run nibble yet); the CUDA estimate's other parts
# are the Triton layouts' byte counts, tested on CPU.
CUDA_CONTEXT = 500 * 2**20

FORMATS = ("bf16", "int8", "int4", "int4-g32", "nf4")  # the table's rows unless asked otherwise

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """'8GiB', '120MB', '2.5e9' or a number -> bytes."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
        if not m or m.group(2) not in _UNITS:
            raise ConfigError(f"{text!r} is not a size; write bytes or a number with a unit, "
                              f"e.g. 8GiB, 120MB, 4e9")
        value = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{text!r} is not a positive size")
    return int(value)


def fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class Estimate:
    """Bytes one engine holds on its device; `resident` once loaded, `peak` while serving."""

    model: str
    quant: str
    device: str
    weights: int
    kernels: int  # kernel layouts and copies beyond the stored weights (may be negative)
    kv_cache: int
    kv_tokens: int
    workspace: int
    runtime: int
    budget: int

    @property
    def resident(self) -> int:
        return self.weights + self.kernels + self.kv_cache + self.runtime

    @property
    def peak(self) -> int:
        return self.resident + self.workspace

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "resident": self.resident, "peak": self.peak,
                "fits": self.fits}


def estimate(cfg: EngineConfig, concurrency: int | None = None, memory: int | None = None,
             kv_dtype: torch.dtype | None = None, described=None) -> Estimate:
    """The memory `LLM(config=cfg)` needs. concurrency: the KV cache for that many sequences of
    cfg's context length (default: what the engine reserves for cfg, engine/
    model_runner.py num_kv_blocks); memory: the budget (default: the device's)."""
    from engine import build
    from engine.layers.attention import KVCache
    from engine.layers.attention import kv_dtype as engine_kv_dtype
    from engine.model_runner import kv_budget
    from engine.models.llama import LlamaModel, residual_dtype_for

    source, mc, policy, max_len = described or build.describe(cfg)
    device = torch.device(cfg.device)
    total = memory or device_memory(cfg.device)
    # modules with shapes and formats but no weights: the methods hold nothing until a load,
    # and the embedding's torch.empty is address space the process never touches (PyTorch's
    # meta device would do too, but its first ops import about 150 MiB of Python modules)
    model = LlamaModel(mc, policy, max_len, residual_dtype_for(policy.act_dtype, device))
    weights, kernels, scratch = _weights(model, policy, device)
    kv_type = kv_dtype or engine_kv_dtype(policy.act_dtype, device)
    per_block = KVCache.bytes_per_block(mc.num_layers, cfg.block_size, mc.num_kv_heads,
                                        mc.head_dim, kv_type)
    seq_blocks = -(-max_len // cfg.block_size)
    if concurrency is not None:
        blocks = concurrency * seq_blocks
    else:
        blocks = kv_budget(per_block, seq_blocks, cfg.max_num_seqs, cfg.kv_cache_memory, total)
    rotary = 2 * max_len * (mc.head_dim // 2) * 4  # the cos and sin tables, fp32
    runtime = RUNTIME_FIXED + RUNTIME_PER_TOKEN * mc.vocab_size + rotary
    if device.type == "cuda":
        runtime += CUDA_CONTEXT
    return Estimate(
        model=source.name, quant=policy.describe(), device=cfg.device, weights=weights,
        kernels=kernels, kv_cache=blocks * per_block,
        kv_tokens=blocks * cfg.block_size,
        workspace=scratch + _activations(mc, cfg, max_len, policy.act_dtype),
        runtime=runtime, budget=total)


def _weights(model, policy: QuantPolicy, device: torch.device) -> tuple[int, int, int]:
    """(stored bytes, kernel bytes beyond them, shared scratch bytes) of a model not loaded."""
    tied = model.config.tie_word_embeddings
    stored = kernel = 0
    scratch: dict[tuple, int] = {}
    for name, lin in model.quant_linears().items():
        spec, N, K = lin.spec, lin.out_features, lin.in_features
        bias = N * lin.act_dtype.itemsize if lin.has_bias else 0
        shared = tied and name == "lm_head" and spec.is_float and \
            spec.method == policy.float_name
        own = 0 if shared else _stored_bytes(lin.method) + bias
        held, buffers = _held_bytes(spec, N, K, lin.act_dtype, device, shared)
        stored += own
        kernel += held + (0 if shared else bias) - own
        scratch.update(buffers)
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # embedding, norms
    return stored + params, kernel, sum(scratch.values())


def _stored_bytes(method) -> int:
    """The stored tensors' bytes: each method's shapes (what `load` checks) in the dtypes its
    `quantize` writes (read off one quantized row; an optional tensor that only calibration
    writes, such as w8a8's 4-byte input scale, is not counted)."""
    dtypes = _stored_dtypes(method.spec, method.in_features)
    return sum(math.prod(shape) * dtypes[k].itemsize
               for k, shape in method.expected_shapes().items() if k in dtypes)


_DTYPES: dict[tuple, dict[str, torch.dtype]] = {}


def _stored_dtypes(spec: QuantSpec, K: int) -> dict[str, torch.dtype]:
    from engine.quant.base import make_method

    key = (str(spec), K)
    if key not in _DTYPES:
        row = make_method(spec, K, 1, torch.float32).quantize(torch.zeros(1, K))
        _DTYPES[key] = {k: v.dtype for k, v in row.items()}
    return _DTYPES[key]


def _held_bytes(spec: QuantSpec, N: int, K: int, act: torch.dtype, device: torch.device,
                shared: bool) -> tuple[int, dict[tuple, int]]:
    """What one prepared module keeps on the device, and its scratch buffers."""
    if spec.is_float:
        nbytes = N * K * FLOAT_FORMATS[spec.method].itemsize
        if device.type != "cpu":
            return (0 if shared else nbytes), {}
        from kernels import cpu

        packed = cpu.fp16_gemm_expected(N, K, act) and spec.method != "fp32"
        if packed:  # fbgemm's copy: beside the embedding it shares, or instead of the weight
            return cpu.fp16_gemm_bytes(N, K), {}
        return (0 if shared else nbytes), {}
    from kernels import formats

    fmt = formats.get(spec.format)
    if device.type == "cuda":
        return fmt.triton_bytes(N, K, spec.group_size, act), {}
    return (fmt.cpu_bytes(N, K, spec.group_size, act),
            fmt.cpu_scratch(N, K, spec.group_size, act))


def _activations(mc: ModelConfig, cfg: EngineConfig, max_len: int, act: torch.dtype) -> int:
    """The largest forward pass: `max_num_batched_tokens` rows through one layer at a time
    (residual, normed input, q|k|v, attention output, gate|up, their product; fp32 plus a copy
    in the activation dtype for each linear input), the keys and values one sequence's
    attention gathers, and the logits of every row with their log-softmax, which a request for
    prompt logprobs (echo, as lm-eval sends) takes. Not counted: `score` for compare and the
    shadow, which holds [tokens, vocab] fp32 logits of a whole sequence."""
    rows = cfg.max_num_batched_tokens
    f32 = 4
    width = (3 * mc.hidden_size + mc.q_size + 2 * mc.kv_size + mc.q_size
             + 3 * mc.intermediate_size) * f32
    width += (mc.hidden_size + mc.q_size + mc.intermediate_size) * act.itemsize
    gathered = 2 * max_len * mc.kv_size * f32
    logits = 2 * rows * mc.vocab_size * f32
    return rows * width + gathered + logits


def fitting(cfg: EngineConfig, formats: tuple[str, ...], **kwargs) -> list[Estimate]:
    """One estimate per format (each as the quantization, with cfg's rules), from one parse of
    the file; a model stored quantized (a nibble checkpoint, GPTQ, AWQ) gets one row, its own."""
    from engine import build
    from engine.loader import reader_cache

    with reader_cache():
        source, mc, policy, max_len = build.describe(
            dataclasses.replace(cfg, quant=None, rules=()))
        if policy != QuantPolicy.build():  # the files decide the formats
            return [estimate(dataclasses.replace(cfg, quant=None, rules=()), **kwargs)]
        out = []
        for q in formats:
            c = dataclasses.replace(cfg, quant=q)
            described = None if c.gguf_native else (source, mc, c.policy, max_len)
            out.append(estimate(c, described=described, **kwargs))
        return out


def format_table(ests: list[Estimate]) -> str:
    e0 = ests[0]
    lines = [f"{e0.model} on {e0.device}: KV cache for {e0.kv_tokens} tokens, budget "
             f"{fmt_bytes(e0.budget)}",
             f"{'format':<16} {'weights':>9} {'kernels':>9} {'KV cache':>10} {'workspace':>10} "
             f"{'runtime':>9} {'resident':>10} {'peak':>10}  fits"]
    for e in ests:
        lines.append(f"{e.quant[:16]:<16} {fmt_bytes(e.weights):>9} {fmt_bytes(e.kernels):>9} "
                     f"{fmt_bytes(e.kv_cache):>10} {fmt_bytes(e.workspace):>10} "
                     f"{fmt_bytes(e.runtime):>9} {fmt_bytes(e.resident):>10} "
                     f"{fmt_bytes(e.peak):>10}  {'yes' if e.fits else 'no'}")
    lines.append("weights: stored, as `nibble inspect` counts them; kernels: what the device's "
                 "kernels keep beyond them")
    if e0.device == "cpu":
        lines.append("(on CPU: fbgemm's fp16 copy of 16-bit layers where it is faster, nf4 "
                     "dequantized to 16-bit, int4 with fp32 scales); resident: after loading; "
                     "peak: while serving")
    return "\n".join(lines)


def check_fits(configs: list[EngineConfig]) -> list[Estimate]:
    """Before loading the engines of one process (a server's variants, or one LLM): raise
    ConfigError, with the estimate and what would fit, when together they cannot fit the
    device's memory. They share one runtime and run one forward pass at a time."""
    ests = [estimate(c) for c in configs]
    runtime = max(e.runtime for e in ests)
    need = sum(e.resident - e.runtime for e in ests) + runtime + max(e.workspace for e in ests)
    budget = ests[0].budget
    if need <= budget:
        return ests
    est = ests[0]
    parts = "; ".join(
        f"{e.quant}: weights {fmt_bytes(e.weights)}, kernels {fmt_bytes(e.kernels)}, KV cache "
        f"{fmt_bytes(e.kv_cache)} for {e.kv_tokens} tokens, workspace {fmt_bytes(e.workspace)}"
        for e in ests)
    others = [e for e in fitting(configs[0], FORMATS) if e.fits and e.quant != est.quant]
    hint = (f"; alone, these fit: {', '.join(f'{e.quant} ({fmt_bytes(e.peak)})' for e in others)}"
            if others else "")
    kv = sum(e.kv_cache for e in ests)
    room = budget - (need - kv)
    if room > 0:  # the KV cache is what shrinks most easily: say how much of it would fit
        hint += (f"; beside the weights there is room for {fmt_bytes(room)} of KV cache, "
                 f"{room * est.kv_tokens // est.kv_cache} tokens of {est.quant}")
    raise ConfigError(
        f"{est.model} needs about {fmt_bytes(need)} on {est.device} ({parts}; runtime "
        f"{fmt_bytes(runtime)}) and the device has {fmt_bytes(budget)}{hint}. Lower "
        f"--max-model-len or --kv-cache-memory, or choose a smaller --quant (`nibble plan` shows "
        f"the table)")
