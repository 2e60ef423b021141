"""Which path serves which batch size, measured once per GPU and layer shape.

For every M bucket (1, 2, 4, ..., 256) the tuner times each candidate launch of the fused
kernel and the dequantize-then-torch.matmul path on the real weights, keeps the fastest, and
caches the choice in $NIBBLE_CACHE/tuning/<gpu name>.json (the Triton version is part of each
key; kernels/tuning_cache.py), so later starts read it instead of measuring, and
NIBBLE_RETUNE=1 measures again. The plan is a tuple with one KernelConfig
per bucket; a call with M rows takes the first bucket >= M (the last one beyond 256).

Under TRITON_INTERPRET=1 (CPU, tests) or with NIBBLE_TUNE=0 nothing is timed: the fixed
DEFAULT_PLAN serves, labelled "untuned" in the log line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import triton
from torch import Tensor

from kernels import tuning_cache
from kernels.triton import qgemm
from kernels.triton.qgemm import KernelConfig

log = logging.getLogger("nibble.kernels")

M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_BUCKET_OF = [next(i for i, b in enumerate(M_BUCKETS) if m <= b) for m in range(M_BUCKETS[-1] + 1)]

_SKINNY = KernelConfig(block_m=16, block_n=64, block_k=64, split_k=4)
_TILED = KernelConfig(block_m=64, block_n=64, block_k=64, num_stages=3)
DEFAULT_PLAN = tuple(_SKINNY if m <= 16 else _TILED for m in M_BUCKETS)

# What a launch that this GPU cannot run raises; the tuner skips that candidate.
_CANDIDATE_FAILURES = (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError,
                       RuntimeError)

Timer = Callable[[Callable[[], object]], float]  # runs a callable, returns milliseconds


def bucket_index(rows: int) -> int:
    """Index into M_BUCKETS of the bucket serving a call with this many rows."""
    return _BUCKET_OF[rows] if rows < len(_BUCKET_OF) else len(M_BUCKETS) - 1


def candidates(M: int, packed: bool = True) -> list[KernelConfig]:
    """The launches worth timing for M rows: skinny ones for decode (split-K spreads a narrow N
    over more SMs), tiles for prefill, GEMV-style for M <= 4, and always dequantize-then-matmul.
    `packed` (int4, nf4) adds the nibble-plane unpacking of each."""
    K_TILES = {False: (64, 128), True: (128, 256)}  # plane dots need BLOCK_K / 8 >= 16
    out: list[KernelConfig] = []
    for planes in (False, True) if packed else (False,):
        if M <= 16:
            for bn in (64, 128):
                for bk in K_TILES[planes]:
                    for split in (1, 2, 4, 8):
                        out.append(KernelConfig(block_m=16, block_n=bn, block_k=bk,
                                                split_k=split, planes=planes))
            if M <= 4:
                for bn in (64, 128) if planes else (32, 64):
                    # the [M, BLOCK_K, BLOCK_N] product lives in registers: keep it small
                    for split in (1, 4):
                        out.append(KernelConfig(block_m=M, block_n=bn,
                                                block_k=64 if M <= 2 else 32,
                                                split_k=split, use_dot=False, planes=planes))
        else:
            for bm in sorted({min(M, 64), min(M, 128)}):
                for bn in (64, 128):
                    for bk in K_TILES[planes][:1] if planes else (32, 64):
                        out.append(KernelConfig(block_m=bm, block_n=bn, block_k=bk,
                                                num_warps=8 if bm * bn >= 128 * 128 else 4,
                                                num_stages=4 if bk == 32 else 3, planes=planes))
    out.append(KernelConfig(dense=True))
    return out


def gpu_timer(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=25)


def cache_path(device: torch.device) -> Path:
    return tuning_cache.file_for(torch.cuda.get_device_name(device))


def shape_key(fmt: str, K: int, N: int, group_size: int | None, dtype: torch.dtype) -> str:
    dt = str(dtype).removeprefix("torch.")
    return f"triton{triton.__version__}/{fmt}/g{group_size or 0}/{dt}/K{K}/N{N}"


def measure_plan(run: Callable[[Tensor, KernelConfig], Tensor], K: int, dtype: torch.dtype,
                 device: torch.device, timer: Timer, packed: bool = True) -> list[dict]:
    """For each bucket: the fastest candidate and its time, with the best fused kernel's and the
    dequant-matmul path's times beside it. `run(x, cfg)` computes the layer for x [M, K]."""
    rows = []
    for M in M_BUCKETS:
        x = torch.randn(M, K, device=device, dtype=dtype)
        times: dict[KernelConfig, float] = {}
        for cfg in candidates(M, packed):
            try:
                times[cfg] = timer(lambda x=x, cfg=cfg: run(x, cfg))
            except _CANDIDATE_FAILURES as exc:  # e.g. too much shared memory on this GPU
                log.warning("skipping %s at M=%d: %s", cfg.describe(), M, str(exc)[:200])
        if not times:
            raise RuntimeError(f"no kernel candidate ran for M={M}, K={K}")
        best = min(times, key=times.get)
        fused = [t for cfg, t in times.items() if not cfg.dense]
        rows.append({"m": M, "ms": times[best], "config": asdict(best),
                     "fused_ms": min(fused) if fused else None,
                     "dense_ms": times.get(KernelConfig(dense=True))})
    return rows


# Plans already decided in this process, by (shape key, cache file or "untuned"): a model has
# a few distinct shapes over many layers, and each is looked up and logged once.
_MEMO: dict[tuple[str, str], tuple[KernelConfig, ...]] = {}


def plan_for(key: str, run: Callable[[Tensor, KernelConfig], Tensor], K: int,
             dtype: torch.dtype, device: torch.device, timer: Timer | None = None,
             path: Path | None = None, packed: bool = True) -> tuple[KernelConfig, ...]:
    """The plan for one layer shape: cached, measured now, or DEFAULT_PLAN where nothing may
    be timed (see the module docstring)."""
    if timer is None:
        if device.type != "cuda" or qgemm.interpreting() or os.environ.get("NIBBLE_TUNE") == "0":
            if (key, "untuned") not in _MEMO:
                _MEMO[key, "untuned"] = DEFAULT_PLAN
                _log_plan(key, DEFAULT_PLAN, "untuned")
            return DEFAULT_PLAN
        timer = gpu_timer
    path = path or cache_path(device)
    if (key, str(path)) in _MEMO:
        return _MEMO[key, str(path)]
    cached = {} if tuning_cache.retune() else tuning_cache.read(path)
    if key in cached:
        rows, source = cached[key], f"cached in {path}"
    else:
        log.info("tuning %s for batch sizes %s ...", key, ",".join(map(str, M_BUCKETS)))
        rows, source = measure_plan(run, K, dtype, device, timer, packed), "measured"
        tuning_cache.store(path, key, rows)
    plan = _MEMO[key, str(path)] = tuple(KernelConfig(**row["config"]) for row in rows)
    _log_plan(key, plan, source)
    return plan


def measurements(key: str, device: torch.device) -> list[dict] | None:
    """The tuner's rows for a shape key as cached for this GPU (None where it was not tuned)."""
    return tuning_cache.read(cache_path(device)).get(key)


def _log_plan(key: str, plan: tuple[KernelConfig, ...], source: str) -> None:
    spans, start = [], 0
    for i in range(1, len(plan) + 1):
        if i == len(plan) or plan[i].label != plan[start].label:
            lo, hi = M_BUCKETS[start - 1] + 1 if start else 1, M_BUCKETS[i - 1]
            hi_s = f"{hi}" if i < len(plan) else f"{hi}+"
            spans.append(f"M {lo}-{hi_s}: {plan[start].label}")
            start = i
    log.info("kernel dispatch %s (%s): %s", key, source, "; ".join(spans))
