"""W8A8 on CPU, one linear layer at a time: nibble's kernels against the other ways to multiply
the same layer, on the default model's shapes, in one run.

Candidates per (K, N) and row count M, median microseconds of one call (activations bf16):
- w8a8 native: kernels/csrc/w8a8_cpu.cpp (rows rounded to int8, int32 sums, AVX2);
- w8a8 dense: the same numbers through one float32 GEMM over the widened codes (kernels/w8a8.py);
- torch._int_mm: PyTorch's int8 x int8 -> int32 GEMM on the rounded rows (the scaling after
  it not included, so it is timed at its best);
- int8 (W8A16): PyTorch's `_weight_int8pack_mm` on bf16 activations;
- bf16 F.linear, and fbgemm's fp16 GEMM on the same weights (what 16-bit layers run).
Writes JSON under benchmarks/results/.

    python benchmarks/w8a8_cpu.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.machine import machine_info, write_report  # noqa: E402
from kernels import cpu, native, w8a8  # noqa: E402
from kernels import reference as R  # noqa: E402

# smollm2-135m: q|k|v, o, gate|up, down
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]


def median_us(fn, x, reps: int) -> float:
    fn(x)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e6, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,16,64,256")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if native.load() is None:
        sys.exit(f"nibble's native kernels do not run here: {native.supported() or 'build failed'}")
    rows = []
    for K, N in SHAPES:
        g = torch.Generator().manual_seed(K + N)
        w = torch.randn(N, K, generator=g) * 0.02
        q, s = R.quantize_int8(w)
        layer = w8a8.cpu_prepare({"qweight": q, "scales": s}, K=K, group_size=None,
                                 act_dtype=torch.bfloat16, batch_invariant=True)
        int8 = cpu.int8_prepare(q, s, torch.bfloat16, batch_invariant=True)
        wb = w.bfloat16()
        packed = torch.ops.quantized.linear_prepack_fp16(wb.float(), None)
        for M in (int(m) for m in args.rows.split(",")):
            x = torch.randn(M, K, generator=g).bfloat16()
            xq, _ = R.quantize_activations(x)
            row = {"K": K, "N": N, "M": M, "us": {
                "w8a8 native": median_us(layer.fused, x, args.reps),
                "w8a8 dense": median_us(layer.dense, x, args.reps),
                # [K, N] as a view of the [N, K] codes: the faster of the two layouts here
                "torch._int_mm": median_us(lambda _x, a=xq, b=q.T: torch._int_mm(a, b), x,
                                           args.reps),
                "int8 (W8A16)": median_us(int8.fused, x, args.reps),
                "bf16 F.linear": median_us(lambda x, w=wb: F.linear(x, w), x, args.reps),
                "fbgemm fp16": median_us(lambda x, p=packed: cpu.fp16_gemm(x, p), x, args.reps),
            }}
            rows.append(row)
            print(K, N, M, row["us"], flush=True)
    names = list(rows[0]["us"])
    lines = ["| K x N | M | " + " | ".join(names) + " |",
             "|---|---:|" + "---:|" * len(names)]
    for r in rows:
        lines.append(f"| {r['K']}x{r['N']} | {r['M']} | "
                     + " | ".join(f"{r['us'][n]:.0f}" for n in names) + " |")
    report = {"benchmark": "w8a8-cpu", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "unit": "median microseconds per call, bf16 activations", "machine": machine_info(),
              "results": rows}
    write_report(report, args.out, "w8a8-cpu", "\n".join(lines))


if __name__ == "__main__":
    main()
