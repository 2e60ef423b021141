"""NF4 on CPU: which way of computing x @ W.T is fastest when W is NF4.

No fused 4-bit NF4 op exists in PyTorch's CPU kernels, so kernels/cpu.py must pick a path.
Candidates, all checked against kernels/reference.py before they are timed:
  unpack+index   unpack both nibbles, index the code book, scale per group, matmul (per call)
  pair-table     one gather on packed bytes from a 256-entry byte -> (low, high) value table
  x-table (M=1)  per call, a [K/2, 256] table of x-pair dot products; gather it by the packed
                 bytes (a GEMV that never expands W)
  dense-once     dequantize once at prepare into bf16, then F.linear (what kernels/cpu.py does)
  int4 fused     the int4 fused op on the same shape, as a yardstick
Shapes are the default model's K x N; M = 1 (decode) and 64 (prefill); bf16 activations,
group 64. Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import machine_info  # noqa: E402
from kernels import reference as R  # noqa: E402

DT, G = torch.bfloat16, 64
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]
CB = R.NF4_CODEBOOK
PAIRS = torch.stack([CB[torch.arange(256) & 15], CB[torch.arange(256) >> 4]], -1)  # [256, 2]


def unpack_index(p, a, k):
    cb, a = CB.to(DT), a.to(DT)

    def run(x):
        n = p.shape[0]
        q = torch.stack([p & 15, p >> 4], -1).view(n, -1).long()
        return F.linear(x, (cb[q].view(n, -1, G) * a[..., None]).view(n, -1))
    return run


def pair_table(p, a, k):
    table, a = PAIRS.to(DT), a.to(DT)
    flat = p.view(-1).int()

    def run(x):
        n = p.shape[0]
        w = table.index_select(0, flat).view(n, -1, G) * a[..., None]
        return F.linear(x, w.view(n, -1))
    return run


def x_table(p, a, k):
    n, half = p.shape
    idx = (p.long() + 256 * torch.arange(half)).view(-1)
    lo, hi, af = PAIRS[:, 0], PAIRS[:, 1], a.float()

    def run(x):
        xf = x.float().view(-1, 2)
        table = xf[:, :1] * lo + xf[:, 1:] * hi  # [K/2, 256]
        v = table.view(-1).take(idx).view(n, -1, G // 2).sum(-1)
        return (v * af).sum(-1)[None].to(x.dtype)
    return run


def dense_once(p, a, k):
    w = R.dequantize_nf4(p, a, G, k).to(DT)
    return lambda x: F.linear(x, w)


def int4_fused(p, a, k):
    n = p.shape[0]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.randint(0, 16, (n, k), dtype=torch.int32), 2)
    sz = torch.randn(k // G, n, 2, dtype=DT)
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, G, sz)


CANDIDATES = {"unpack+index": unpack_index, "pair-table": pair_table, "x-table (M=1)": x_table,
              "dense-once": dense_once, "int4 fused (yardstick)": int4_fused}


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for k, n in SHAPES:
        p, a = R.quantize_nf4(torch.randn(n, k) * 0.02, G)
        for m in (1, 64):
            x = torch.randn(m, k, dtype=DT)
            ref = R.nf4_linear(x, p, a, G).float()
            for name, make in CANDIDATES.items():
                if name.endswith("(M=1)") and m != 1:
                    continue
                run = make(p, a, k)
                err = ((run(x).float() - ref).abs().max() / ref.abs().max()).item()
                if "yardstick" not in name and err > 0.02:
                    raise SystemExit(f"{name} is wrong on {k}x{n}: relative error {err:.3g}")
                t = benchmark.Timer("run(x)", globals={"run": run, "x": x}).blocked_autorange(min_run_time=0.5)
                rows.append({"candidate": name, "M": m, "K": k, "N": n, "us": round(t.median * 1e6, 1)})
                print(f"M={m:<3} {k}x{n:<5} {name:<24} {t.median * 1e6:8.1f} us", file=sys.stderr)
    out = Path(__file__).resolve().parent / "results" / f"nf4-cpu-{time.strftime('%Y-%m-%d')}.json"
    report = {"benchmark": "nf4_cpu", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dtype": "bf16",
              "group_size": G, "machine": machine_info(), "results": rows}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
