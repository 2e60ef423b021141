"""What each storage format costs against bf16 on the same weights: `nibble compare` for every
format in one run, one table.

Per format (engine/eval, the same code as `nibble compare`): teacher-forced on CPython's
pydoc_data.topics, chunks of --ctx tokens with the second half scored: mean KL divergence of its
next-token distribution from bf16's with a 95% bootstrap interval over chunks, p99 KLD, top-1
agreement, the paired perplexity ratio; greedy free-running agreement on the 12 built-in
prompts; decode tok/s against bf16 timed alternately in the same run; weight bytes. bf16 is
loaded once and serves as A for every row. Writes JSON under benchmarks/results/.

    python benchmarks/quality.py                         # default formats, 16 chunks of 512
    python benchmarks/quality.py --formats int4,int4-g32 --chunks 4
    python benchmarks/quality.py --formats int4 --gptq 128 --awq 128 \\
        --out benchmarks/results/calibrated-DATE.json

--gptq G / --awq G add a row for `nibble quantize --method gptq|awq --group-size G`
(calibrated on its built-in text, which is not the corpus measured here), loaded from the
directory it writes; --act-order quantizes the GPTQ row with --act-order. `--formats gguf`
is the GGUF default model on its own blocks.

    python benchmarks/quality.py --formats gguf,int4-g32,int8-g32,int8 --gptq 128 --act-order \\
        --out benchmarks/results/gguf-2026-11-23.json
    python benchmarks/quality.py --reference fp32 --formats bf16,gguf \\
        --out benchmarks/results/gguf-fp32-2026-11-23.json

--reference picks the A side of every row (default bf16).

--smoothquant A[,A...] adds a row per alpha for `nibble quantize --method smoothquant --alpha A`
(w8a8 with smoothing folded in, calibrated on the built-in text), and --act-scales
dynamic,static picks which activation scales those rows use (a row each):

    python benchmarks/quality.py --formats w8a8 --smoothquant 0.5,0.8 \\
        --act-scales dynamic,static --out benchmarks/results/smoothquant-DATE.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import machine_info, write_report  # noqa: E402
from engine import LLM  # noqa: E402
from engine.eval import CompareOptions, compare  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--formats", default="int8,int4-g32,int4-g64,int4,nf4")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--gptq", type=int, metavar="G", help="also GPTQ int4 with group size G")
    ap.add_argument("--awq", type=int, metavar="G", help="also AWQ int4 with group size G")
    ap.add_argument("--act-order", action="store_true", help="the --gptq row with --act-order")
    ap.add_argument("--reference", default="bf16", help="the A side of every row (default bf16)")
    ap.add_argument("--smoothquant", metavar="ALPHAS", help="also w8a8 smoothed at each alpha")
    ap.add_argument("--act-scales", default="dynamic",
                    help="the --smoothquant rows' activation scales: dynamic, static, or dynamic,static (a row each)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    opts = CompareOptions(ctx=args.ctx, chunks=args.chunks, max_tokens=args.max_tokens)
    base = LLM(args.model, quant=args.reference, progress=False)
    rows = []
    variants = [(fmt, {"quant": fmt}) for fmt in args.formats.split(",")]
    calibrated = [(f"{m}{'-act-order' if m == 'gptq' and args.act_order else ''}-g{g}",
                   [m, "--group-size", str(g), *(["--act-order"] if m == "gptq" and
                                                 args.act_order else [])])
                  for m, g in (("gptq", args.gptq), ("awq", args.awq)) if g]
    for alpha in (args.smoothquant.split(",") if args.smoothquant else []):
        for scales in args.act_scales.split(","):
            calibrated.append((f"w8a8-sq{alpha}-{scales}", ["smoothquant", "--alpha", alpha,
                                                            "--act-scales", scales]))
    for label, (method, *flags) in calibrated:
        from server.cli import main as nibble

        out = Path(tempfile.mkdtemp(prefix=f"nibble-{method}-")) / method
        if nibble(["quantize", "--method", method, "--model", args.model, *flags,
                   "--out", str(out)]) != 0:
            sys.exit(f"nibble quantize --method {method} {' '.join(flags)} failed")
        variants.append((label, {"model": str(out)}))
    for fmt, how in variants:
        llm = LLM(how.get("model", args.model), quant=how.get("quant"), progress=False)
        report = compare(base, llm, args.reference, fmt, opts, progress=True).report
        rows.append({"format": fmt, **{k: report[k] for k in ("b", "teacher_forced", "free_running", "cost")}})
        print(f"{fmt:>10}: mean KLD {report['teacher_forced']['kld']['mean']:.4f}", file=sys.stderr)
        del llm
    report = {"benchmark": "quality", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "model": args.model, "reference": args.reference, "options": vars(opts),
              "machine": machine_info(), "results": rows}
    write_report(report, args.out, "quality", table(rows, args.reference))


def table(rows: list[dict], reference: str = "bf16") -> str:
    lines = ["| format | mean KLD (95% CI) | p99 KLD | top-1 agreement (95% CI) | PPL ratio (95% CI) "
             f"| identical greedy outputs | median first divergence | decode vs {reference} "
             f"| weights vs {reference} |",
             "|---|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        t, f, c = r["teacher_forced"], r["free_running"], r["cost"]
        k, top, ppl = t["kld"], t["top1_agreement"], t["ppl_ratio"]
        div = f["median_first_divergence"]
        lines.append(
            f"| {r['format']} | {k['mean']:.4f} ({k['ci95'][0]:.4f}-{k['ci95'][1]:.4f}) | {k['p99']:.3f} "
            f"| {100 * top['value']:.1f}% ({100 * top['ci95'][0]:.1f}-{100 * top['ci95'][1]:.1f}) "
            f"| {ppl['value']:.3f} ({ppl['ci95'][0]:.3f}-{ppl['ci95'][1]:.3f}) "
            f"| {f['exact_match_rate'] * f['prompts']:.0f}/{f['prompts']} "
            f"| {'not reached' if div is None else f'token {div}'} "
            f"| {c['speedup_b_over_a']:.2f}x | {c['weight_ratio_b_over_a']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
