"""Fused low-bit GEMM kernels against torch's fp16 matmul, on Llama-3-8B's layer shapes.

For every shape (K x N) and batch size M, in one run: torch's dense fp16 (or bf16) F.linear,
and each quantized format through the path kernels/dispatch.py picks for that M (tuned on this
GPU first, cached per GPU name), plus the tuner's best fused-kernel and dequant-matmul times.
Reports milliseconds, the speedup over fp16, and the achieved memory bandwidth (weight bytes
stored + activations in + results out, over time) against the GPU's nominal peak and a
measured device-to-device copy. JSON goes to benchmarks/results/ with the GPU and versions.

    python benchmarks/kernels.py                          # on a CUDA GPU
    python benchmarks/kernels.py --formats int4 --ms 1,16
    python benchmarks/kernels.py --smoke --out /tmp/k.json  # CPU, tiny shapes, interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = {  # name: (K, N), y[M, N] = x[M, K] @ W
    "qkv": (4096, 6144),
    "o": (4096, 4096),
    "gate_up": (4096, 28672),
    "down": (14336, 4096),
    "lm_head": (4096, 128256),
}
SMOKE_SHAPES = {"qkv": (64, 96), "o": (64, 64), "gate_up": (64, 224), "down": (112, 64)}
MS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FORMATS = {"int4": "int4 g128 asymmetric", "int8": "int8 per channel", "nf4": "nf4 g64"}
GROUPS = {"int4": 128, "int8": 0, "nf4": 64}

# Nominal peak memory bandwidth (bytes/s), from the vendors' data sheets.
PEAK_BW = [(r"H200", 4.8e12), (r"H100.*PCIe", 2.0e12), (r"H100", 3.35e12),
           (r"A100.*80GB", 2.039e12), (r"A100", 1.555e12), (r"L40S", 0.864e12),
           (r"RTX 4090", 1.008e12)]


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="int4,int8,nf4")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="names from: " + ", ".join(SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="batch sizes (rows of x)")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--smoke", action="store_true",
                    help="CPU smoke test: tiny shapes, Triton's interpreter, wall-clock timing")
    ap.add_argument("--out", type=Path, help="JSON path (default: results/kernels-<gpu>-<date>.json)")
    return ap.parse_args()


def main() -> None:
    args = _args()
    if args.smoke:  # before kernels/triton is imported: Triton picks the interpreter at import
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["NIBBLE_KERNELS"] = "triton"
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    if not args.smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (or --smoke for the CPU smoke test)")
    report = run(args)
    out = args.out or RESULTS / f"kernels-{_slug(report['machine'].get('gpu', 'cpu'))}-" \
        f"{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    print(f"\nwrote {out}", file=sys.stderr)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def _timer(device):
    """milliseconds per call: triton's do_bench on a GPU, a wall-clock median on CPU."""
    if device.type == "cuda":
        import triton

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50)

    def wall(fn, reps: int = 3) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return wall


def copy_bandwidth(device) -> float | None:
    """bytes/s of a device-to-device copy of 1 GiB (read + write counted)."""
    import torch

    if device.type != "cuda":
        return None
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _timer(device)(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms / 1e3)


def _prepare(fmt, w_nk, dtype, x):
    """Quantize the [N, K] weight and prepare it as the engine does for its device; check the
    prepared kernels against the dequantized weight on x, so a fast wrong kernel cannot pass."""
    from engine.config import QuantSpec
    from engine.quant import make_method

    N, K = w_nk.shape
    method = make_method(QuantSpec.parse(fmt), K, N, dtype)
    method.load(method.quantize(w_nk))
    stored = method.stored_bytes
    expected = x.float() @ method.dequantize().T
    method.prepare(w_nk.device)
    err = (method.apply(x, None).float() - expected).abs().max() / expected.abs().max()
    if err > 0.02:
        raise AssertionError(f"{fmt} {K}x{N}: kernel output is off by {err:.3f} (relative)")
    return method, stored


def bench_shape(shape: str, K: int, N: int, formats: list[str], ms: list[int], dtype, device,
                timer, peak: float | None) -> list[dict]:
    """Rows for one layer shape: fp16 F.linear and each format's dispatched path, per M."""
    import torch
    import torch.nn.functional as F

    from kernels.triton import tuning

    w = (torch.randn(N, K, device=device) * 0.02).to(dtype)
    xs = {m: torch.randn(m, K, device=device, dtype=dtype) for m in ms}
    dense_ms = {m: timer(lambda x=xs[m]: F.linear(x, w)) for m in ms}
    rows = []
    for fmt in formats:
        method, stored = _prepare(fmt, w, dtype, xs[max(ms)])
        key = tuning.shape_key(fmt, K, N, GROUPS[fmt], dtype)
        measured = tuning.measurements(key, device) if device.type == "cuda" else None
        tuned = {r["m"]: r for r in measured or []}
        for m in ms:
            t = timer(lambda x=xs[m], method=method: method.apply(x, None))
            moved = stored + 2 * m * (K + N)
            rows.append({
                "shape": shape, "K": K, "N": N, "format": fmt, "m": m,
                "fp16_ms": round(dense_ms[m], 5), "ms": round(t, 5),
                "speedup": round(dense_ms[m] / t, 3), "path": method.kernel_path(m),
                "gb_per_s": round(moved / (t / 1e3) / 1e9, 1),
                "of_peak": round(moved / (t / 1e3) / peak, 3) if peak else None,
                "tuned_bucket": tuned.get(tuning.M_BUCKETS[tuning.bucket_index(m)]),
            })
            print(f"{shape:>8} {fmt:>5} M={m:<4} fp16 {dense_ms[m]:8.4f} ms  {fmt} {t:8.4f} ms"
                  f"  x{dense_ms[m] / t:5.2f}  {rows[-1]['path']}", file=sys.stderr)
    return rows


def run(args) -> dict:
    import torch

    from benchmarks.machine import machine_info

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    shapes = SMOKE_SHAPES if args.smoke else {s: SHAPES[s] for s in args.shapes.split(",")}
    ms = [int(m) for m in args.ms.split(",")]
    timer = _timer(device)
    machine = machine_info()
    peak = next((bw for pat, bw in PEAK_BW if re.search(pat, machine.get("gpu", ""))), None)
    rows = []
    for shape, (K, N) in shapes.items():
        rows += bench_shape(shape, K, N, args.formats.split(","), ms, dtype, device, timer, peak)
    return {"benchmark": "kernels", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "smoke": args.smoke, "dtype": args.dtype, "formats": FORMATS,
            "definition": "ms per call (triton do_bench on GPU); speedup = dense F.linear ms / "
            "ms; GB/s = (stored weight bytes + 2 bytes * M * (K + N)) / time",
            "peak_bytes_per_s": peak, "copy_bytes_per_s": copy_bandwidth(device),
            "machine": machine, "results": rows}


def table(report: dict) -> str:
    """Speedup over fp16 per shape and M, one column per format (the README's table)."""
    fmts = list(dict.fromkeys(r["format"] for r in report["results"]))
    lines = ["| shape (KxN) | M | fp16 ms | " + " | ".join(f"{f} x (path)" for f in fmts) + " |",
             "|---|---:|---:|" + "---:|" * len(fmts)]
    cells: dict[tuple, dict] = {}
    for r in report["results"]:
        cells[(r["shape"], r["K"], r["N"], r["m"], r["format"])] = r
    for shape, K, N, m in dict.fromkeys((r["shape"], r["K"], r["N"], r["m"])
                                         for r in report["results"]):
        first = cells[(shape, K, N, m, fmts[0])]
        cols = [f"{cells[(shape, K, N, m, f)]['speedup']:.2f} ({cells[(shape, K, N, m, f)]['path']})"
                for f in fmts]
        lines.append(f"| {shape} {K}x{N} | {m} | {first['fp16_ms']:.4f} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
