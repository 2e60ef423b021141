"""Single-stream decode speed: nibble's formats against transformers' generate(), one run.

Every variant generates the same number of new tokens (greedy, EOS ignored) from the same
chat prompt; tok/s = new tokens / wall time of the whole call (prefill included), the same
definition for every variant. Variants are measured in interleaved rounds so that machine
noise hits them alike; the median of the rounds is reported with each variant's ratio to
transformers fp32. Writes JSON with machine, versions and date under benchmarks/results/.

    python benchmarks/decode.py                       # all formats, 128 tokens, 3 rounds
    python benchmarks/decode.py --formats int4 --rounds 1 --no-transformers
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import machine_info, write_report  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.report import bytes_per_format, module_weights  # noqa: E402

QUESTION = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


class Nibble:
    def __init__(self, model: str, quant: str):
        self.name = f"nibble {quant}"
        self.llm = LLM(model, quant=quant, progress=False)
        self.ids = self.llm.encode_chat(QUESTION)
        self.weight_bytes = sum(bytes_per_format(module_weights(self.llm.model)).values())

    def run(self, n: int) -> float:
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        out = self.llm.generate(self.ids, params)[0]
        wall = time.perf_counter() - start
        assert len(out.token_ids) == n
        return n / wall



class Transformers:
    def __init__(self, source, tokenizer_ids: list[int]):
        from transformers import AutoModelForCausalLM

        self.name = "transformers fp32"
        path = source.path
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        self.ids = torch.tensor([tokenizer_ids])
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.inference_mode()
    def run(self, n: int) -> float:
        start = time.perf_counter()
        out = self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=2)
        wall = time.perf_counter() - start
        assert out.shape[1] - self.ids.shape[1] == n
        return n / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--formats", default="fp32,bf16,int8,int4,nf4")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per run (default 128)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--out", type=Path, help="JSON path (default: results/decode-<date>.json)")
    args = ap.parse_args()

    variants = [Nibble(args.model, q) for q in args.formats.split(",")]
    if not args.no_transformers:
        from engine import hub

        variants.insert(0, Transformers(hub.resolve_model(args.model, progress=False), variants[0].ids))
    for v in variants:  # warm-up: first calls allocate and pick kernels
        v.run(8)
    runs: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            runs[v.name].append(v.run(args.tokens))
            print(f"round {r + 1}/{args.rounds} {v.name:>20}: {runs[v.name][-1]:7.1f} tok/s", file=sys.stderr)
    report = _report(args, variants, runs)
    write_report(report, args.out, "decode", _table(report))


def _report(args, variants, runs) -> dict:
    base = statistics.median(runs["transformers fp32"]) if "transformers fp32" in runs else None
    rows = []
    for v in variants:
        med = statistics.median(runs[v.name])
        rows.append({"variant": v.name, "tok_per_s": round(med, 2),
                     "runs": [round(x, 2) for x in runs[v.name]],
                     "vs_transformers_fp32": round(med / base, 2) if base else None,
                     "weight_mib": round(v.weight_bytes / 2**20, 1)})
    return {"benchmark": "decode", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": args.model, "new_tokens": args.tokens, "rounds": args.rounds,
            "prompt_tokens": len(variants[-1].ids), "definition": "new tokens / wall time of one "
            "greedy generate call (prefill included), median of interleaved rounds",
            "machine": machine_info(), "results": rows}


def _table(report: dict) -> str:
    lines = ["| variant | tok/s | vs transformers fp32 | stored weights (MiB) |", "|---|---:|---:|---:|"]
    for r in report["results"]:
        ratio = f"{r['vs_transformers_fp32']:.2f}x" if r["vs_transformers_fp32"] else "-"
        lines.append(f"| {r['variant']} | {r['tok_per_s']:.1f} | {ratio} | {r['weight_mib']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
