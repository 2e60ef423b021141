"""Resident memory of a loaded model: what loading leaves behind beside the weights.

For each format, two fresh processes load the default model with the smallest KV cache the
engine allows (kv_cache_memory=16 MB asks for less than one sequence of the default 8192-token
context, so it gets exactly one: 360 MiB, recorded): one as nibble loads now (the parsed GGUF file let go, the
heap trimmed; engine.loader.release_load_memory), one with the parsed file kept as every load
did before (inside engine.loader.reader_cache(), no trim). Each reports its resident set
(VmRSS, and its anonymous and file-backed parts) after imports and after the load, and the
weight bytes `nibble inspect` counts. Writes JSON under benchmarks/results/.

    python benchmarks/load_memory.py                  # int4, int8, bf16, nf4
    python benchmarks/load_memory.py --quants int4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = """
import contextlib, json, sys
def mem():
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024
    return out
from engine import LLM, loader, plan
from engine.config import EngineConfig
from engine.report import total_bytes
from kernels import native
native.load()
model, mode, quant, max_len, kv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
cfg = EngineConfig(model=model, quant=quant, kv_cache_memory=float(kv),
                   max_model_len=int(max_len) if max_len != "-" else None)
estimate = None
if sys.argv[6] == "estimate":  # from the headers, before the load is measured
    estimate = plan.estimate(cfg).to_json()
    loader.release_load_memory()
before = mem()
with loader.reader_cache() if mode == "kept" else contextlib.nullcontext():
    llm = LLM(config=cfg, progress=False)
    after = mem()  # inside the block: the parsed file is still held
cache = llm.engine.runner.cache
kv = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
print(json.dumps({"before": before, "after": after, "weight_bytes": total_bytes(llm.model),
                  "kv_cache_bytes": kv, "estimate": estimate}))
"""


def measure(model: str, mode: str, quant: str, max_model_len: int | None = None,
            kv_cache_memory: float = 16e6, env: dict | None = None,
            estimate: bool = True) -> dict:
    """One fresh process: its resident growth over LLM(...) and (estimate) `nibble plan`'s
    estimate beside it."""
    proc = subprocess.run([sys.executable, "-c", CHILD, model, mode, quant,
                           str(max_model_len or "-"), str(kv_cache_memory),
                           "estimate" if estimate else "-"], cwd=ROOT,
                          capture_output=True, text=True, check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quants", default="int4,int8,bf16,nf4")
    ap.add_argument("--max-model-len", type=int, help="context to reserve (default: the model's, "
                    "at most 8192)")
    ap.add_argument("--estimate-only", action="store_true", help="measure the load as nibble "
                    "does it now against `nibble plan`'s estimate, without the parsed-file-kept run")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from benchmarks.machine import machine_info, write_report

    modes = ("released",) if args.estimate_only else ("kept", "released")
    rows = []
    for quant in args.quants.split(","):
        row = {"quant": quant}
        for mode in modes:  # the old behaviour first, then the new
            m = measure(args.model, mode, quant, args.max_model_len)
            row["weight_bytes"], row["kv_cache_bytes"] = m["weight_bytes"], m["kv_cache_bytes"]
            row[mode] = {k: m["after"][k] - m["before"][k] for k in m["after"]}
            row["estimate"] = m["estimate"]
            print(f"{quant} {mode}: {row[mode]}", file=sys.stderr)
        if "kept" in row:
            row["rss_ratio_released_over_kept"] = round(row["released"]["VmRSS"]
                                                        / row["kept"]["VmRSS"], 3)
        row["estimate_error"] = round(row["estimate"]["resident"] / row["released"]["VmRSS"] - 1, 4)
        rows.append(row)
    report = {"benchmark": "load_memory", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "model": args.model, "kv_cache_memory_requested": 16e6,
              "max_model_len": args.max_model_len,
              "definition": "growth of the process's resident set (VmRSS, RssAnon, RssFile from "
              "/proc/self/status) from after imports to after LLM(...) returns; kept = the parsed "
              "GGUF file held and no heap trim (every load before this change), released = now; "
              "estimate = engine.plan.estimate(...).resident from the headers, and its error "
              "against released",
              "machine": machine_info(), "results": rows}
    mib = 2 ** 20
    lines = ["| format | weights (MiB) | KV cache (MiB) | resident growth, file kept (MiB) | "
             "now (MiB) | now / kept | `nibble plan` estimate (MiB) | error |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kept = r.get("kept", {}).get("VmRSS")
        lines.append(f"| {r['quant']} | {r['weight_bytes'] / mib:.0f} | "
                     f"{r['kv_cache_bytes'] / mib:.0f} | "
                     f"{f'{kept / mib:.0f}' if kept else '-'} | "
                     f"{r['released']['VmRSS'] / mib:.0f} | "
                     f"{r.get('rss_ratio_released_over_kept', '-')} | "
                     f"{r['estimate']['resident'] / mib:.0f} | {100 * r['estimate_error']:+.1f}% |")
    write_report(report, args.out, "load-memory", "\n".join(lines))


if __name__ == "__main__":
    main()
