"""benchmarks/decode_gpu.py runs end to end on CPU (--smoke: tiny shapes, Triton's interpreter,
eager steps instead of CUDA graphs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LABELS = {"tiled", "split-k", "gemv", "dequant-matmul"}


def test_decode_gpu_benchmark_smoke(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "benchmarks/decode_gpu.py", "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {(r["variant"], r["batch"]): r for r in report["results"]}
    assert len(report["results"]) == 8
    assert set(rows) == {(v, b) for v in ("fp16", "int8", "int4", "nf4") for b in (1, 16)}
    assert all(r["tok_per_s"] > 0 for r in rows.values())
    assert rows["fp16", 1]["vs_fp16"] == rows["fp16", 16]["vs_fp16"] == 1.0
    assert {rows["int4", b]["kernel_path"] for b in (1, 16)} <= LABELS
    size = {v: rows[v, 1]["weight_bytes"] for v in ("fp16", "int8", "int4")}
    assert size["int4"] < size["int8"] < size["fp16"]
    assert report["smoke"] is True and report["graphs"] is False
    assert "| int4 | 16 |" in proc.stdout
