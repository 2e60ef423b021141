"""Which kernels serve a model, and that two processes on one machine choose the same ones.

The CPU dispatch times candidate paths at load; the choices are stored per machine
(kernels/tuning_cache.py), so a second process reads them instead of timing again and computes
the same numbers as the first, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from engine.report import KERNEL_ROWS, kernel_report
from kernels import native

ROOT = Path(__file__).resolve().parents[2]

# One process: load the model with timing on, score a fixed token list; print the process's
# CPU dispatch choices and the logits' bytes digest.
SCRIPT = """
import hashlib, json, sys
from engine import LLM
from kernels import cpu
llm = LLM(sys.argv[1], quant=sys.argv[2], progress=False, max_model_len=128)
logits = llm.score(list(range(200, 264)))
print(json.dumps({"choices": cpu.choices(),
                  "logits": hashlib.sha256(logits.numpy().tobytes()).hexdigest()}))
"""


def _run(model: Path, quant: str, cache: Path) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("NIBBLE_TUNE", "NIBBLE_RETUNE")}
    environ["NIBBLE_CACHE"] = str(cache)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(model), quant], cwd=ROOT,
                          env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_process_reads_the_stored_choices_and_computes_the_same(tiny_llama, tmp_path):
    """Both kinds of choice: the int4 layers' dense-vs-fused crossover per shape, and the bf16
    lm_head's fbgemm fp16 GEMM or F.linear. (NIBBLE_RETUNE: tests/kernels/test_cpu.py.)"""
    first = _run(tiny_llama, "int4", tmp_path)
    kinds = {c["key"].split("/")[1] for c in first["choices"]}
    assert "fp16-gemm" in kinds and kinds & {"int4", "int4-native"}, kinds
    assert {c["source"] for c in first["choices"]} == {"measured"}
    stored = json.loads(next((tmp_path / "tuning").glob("cpu-*.json")).read_text())
    assert stored == {c["key"]: c["value"] for c in first["choices"]}

    second = _run(tiny_llama, "int4", tmp_path)
    assert {c["source"] for c in second["choices"]} == {"cached"}
    assert [(c["key"], c["value"]) for c in second["choices"]] == \
        [(c["key"], c["value"]) for c in first["choices"]]
    assert second["logits"] == first["logits"]


def test_kernel_report_names_each_layer_groups_path(llm_factory):
    llm = llm_factory("int4")
    report = kernel_report(llm.model)
    linears = llm.model.quant_linears()
    assert sum(row["count"] for row in report["layers"]) == len(linears)
    by_module = {row["modules"]: row for row in report["layers"]}
    down = by_module["layers.*.mlp.down_proj"]
    assert down["format"].startswith("int4") and down["count"] == llm.model.config.num_layers
    fast = "cpu-native" if native.load() is not None else "cpu-fused"
    # tests time nothing (NIBBLE_TUNE=0): the fused path at every batch size
    assert [down[f"rows_{m}"] for m in KERNEL_ROWS] == [fast] * len(KERNEL_ROWS)
    assert by_module["lm_head"]["format"] == "bf16" and by_module["lm_head"]["rows_1"] == "F.linear"
    assert report["decode_step"] == ("fused native (int8 activations)" if native.load() is not None
                                     else "per layer")
