"""benchmarks/kernels.py runs end to end on CPU (--smoke: tiny shapes, Triton's interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LABELS = {"tiled", "split-k", "gemv", "dequant-matmul"}


def test_kernel_benchmark_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/kernels.py", "--smoke", "--formats", "int4,nf4", "--ms",
         "1,17", "--out", str(out)], cwd=ROOT, env=dict(os.environ), capture_output=True,
        text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = report["results"]
    assert len(rows) == 4 * 2 * 2  # smoke shapes x formats x batch sizes
    assert {r["format"] for r in rows} == {"int4", "nf4"}
    assert all(r["ms"] > 0 and r["fp16_ms"] > 0 and r["path"] in LABELS for r in rows)
    assert report["machine"]["triton"] and report["smoke"] is True
    assert "| qkv 64x96 | 17 |" in proc.stdout
