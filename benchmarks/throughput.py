"""Aggregate decode throughput of continuous batching, per format and concurrency, one run.

Every request has a distinct 128-token prompt (slices of CPython's pydoc_data.topics, a fresh one for every
run, so the prefix cache finds nothing to share) and generates 128 tokens with EOS ignored. For each
format and each concurrency c, c requests are submitted at once and the engine runs them as
one continuous batch: output tok/s = c x 128 / wall time from submission to the last token
(prefill included). Formats are measured in interleaved rounds, median reported, with each
concurrency's speedup over the same format's single stream. Writes JSON under
benchmarks/results/.

    python benchmarks/throughput.py                       # bf16,int8,int4 at 1,4,16,32
    python benchmarks/throughput.py --formats int4 --concurrency 1,16 --rounds 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import machine_info, write_report  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.eval.texts import BUILTIN, corpus_chunks, corpus_text  # noqa: E402


def run_once(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return len(prompts) * new_tokens / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--formats", default="bf16,int8,int4")
    ap.add_argument("--concurrency", default="1,4,16,32")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; median reported")
    ap.add_argument("--out", type=Path, help="JSON path (default: results/throughput-<date>.json)")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    llms = {q: LLM(args.model, quant=q, progress=False, max_num_seqs=max(levels),
                   max_num_batched_tokens=max(512, max(levels)),
                   max_model_len=args.prompt_tokens + args.new_tokens)
            for q in args.formats.split(",")}
    first = next(iter(llms.values()))
    need = 2 + args.rounds * sum(levels)
    chunks = iter(corpus_chunks(first.tokenizer, corpus_text(BUILTIN)[0], args.prompt_tokens, need))
    warm = [next(chunks) for _ in range(2)]
    for llm in llms.values():  # warm-up: first calls allocate and pick kernels
        run_once(llm, warm, 4)
    runs: dict[tuple[str, int], list[float]] = {(q, c): [] for q in llms for c in levels}
    for r in range(args.rounds):
        batches = {c: [next(chunks) for _ in range(c)] for c in levels}
        for q, llm in llms.items():
            for c in levels:
                runs[q, c].append(run_once(llm, batches[c], args.new_tokens))
                print(f"round {r + 1}/{args.rounds} {q:>5} x{c:<3} {runs[q, c][-1]:7.1f} tok/s",
                      file=sys.stderr)
    report = _report(args, levels, runs)
    report["kernel_paths"] = {q: _paths(llm) for q, llm in llms.items()}
    write_report(report, args.out, "throughput", _table(report))


def _paths(llm: LLM) -> dict:
    """Which kernels served a decoder layer's down projection at 1, 16 and 512 rows, and the
    lm_head (the CPU picks both by measuring at load)."""
    down = llm.model.quant_linears()["layers.0.mlp.down_proj"].method
    out = {f"down_proj_M{m}": down.kernel_path(m) for m in (1, 16, 512)} \
        if hasattr(down, "kernel_path") else {"down_proj": "fbgemm fp16 GEMM" if getattr(
            down, "_fp16_gemm", None) is not None else "F.linear"}
    head = llm.model.lm_head.method
    out["lm_head"] = "fbgemm fp16 GEMM" if getattr(head, "_fp16_gemm", None) is not None \
        else "F.linear"
    out["fused_decode_step"] = llm.model.native_decode is not None  # kernels/csrc
    return out


def _report(args, levels: list[int], runs: dict) -> dict:
    rows = []
    for (q, c), values in runs.items():
        med = statistics.median(values)
        single = statistics.median(runs[q, levels[0]])
        rows.append({"format": q, "concurrency": c, "tok_per_s": round(med, 1),
                     "runs": [round(v, 1) for v in values],
                     f"vs_{levels[0]}_stream": round(med / single, 2)})
    return {"benchmark": "throughput", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": args.model, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "rounds": args.rounds,
            "definition": "aggregate output tokens / wall time of one LLM.generate call over c "
            "requests submitted together (prefill included), median of interleaved rounds",
            "machine": machine_info(), "results": rows}


def _table(report: dict) -> str:
    rows = report["results"]
    levels = sorted({r["concurrency"] for r in rows})
    key = next(k for k in rows[0] if k.startswith("vs_"))
    lines = ["| format | " + " | ".join(f"{c} seq tok/s" for c in levels) + " |",
             "|---|" + "---:|" * len(levels)]
    for q in dict.fromkeys(r["format"] for r in rows):
        cells = {r["concurrency"]: r for r in rows if r["format"] == q}
        lines.append(f"| {q} | " + " | ".join(
            f"{cells[c]['tok_per_s']:.1f} ({cells[c][key]:.2f}x)" for c in levels) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
