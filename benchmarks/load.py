"""Serving capacity of the default model under an SLO, one variant against another in one run,
with `nibble bench serve` (locust, headless):

1. ramp: a nibble server per variant (bf16, the baseline, then int4), Poisson stages from
   --ramp-start req/s, x1.5 per stage, until fewer than 90% of the requests meet the SLO
   (configs/slo-cpu.toml: TTFT <= 2 s and mean inter-token latency <= 250 ms); one bisection.
   Capacity = the highest rate that held; p50/p99 latencies are those of that stage.
2. overload: --overload-quant at twice its capacity, once with the server's defaults (a queue of
   64 beyond the 16 running) and once with 8 running and a 1.5 s queue timeout: how many
   requests get 429, whether any 5xx appears, and whether the accepted ones still meet the SLO.

Chat requests with the short built-in prompts and 64 output tokens (ignore_eos). The load
generator runs on the same machine as the server, so on a 2-core machine it takes CPU time from
it: capacities here are lower bounds for a server with its own cores. Writes
benchmarks/results/load-DATE.json (both reports, without the per-request records) and the two
reports' PNGs beside it.

    python benchmarks/load.py                       # bf16 and int4, about 25 minutes on 2 cores
    python benchmarks/load.py --quants int4 --duration 20 --overload-server-args '--max-queued 4'
    python benchmarks/load.py --markdown benchmarks/results/load-2026-11-23.json   # README tables
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"


def _ms(d: dict) -> str:
    return " / ".join(f"{d[q] / 1000:.2f} s" if d[q] >= 1000 else f"{d[q]:.0f} ms" for q in ("p50", "p99"))


def markdown(result: dict) -> str:
    """The README's tables, from a results file."""
    lines = ["| variant | capacity (goodput >= 90%) | output tok/s | TTFT p50 / p99 | ITL p50 / p99 "
             "| next stage: rate, good | server peak RSS |", "|---|---:|---:|---:|---:|---:|---:|"]
    for t in result["ramp"]["targets"]:
        s, above = t["summary"], [st for st in t["stages"] if st["rate"] > t["capacity_rps"]]
        nxt = min(above, key=lambda st: st["rate"]) if above else None
        nxt = f"{nxt['rate']:.2f} req/s, {100 * nxt['summary']['goodput']['ratio']:.0f}%" if nxt else "-"
        lines.append(f"| {t['label']} | {t['capacity_rps']:.2f} req/s | "
                     f"{s['throughput']['output_tokens_per_s']:.1f} | {_ms(s['ttft_ms'])} | "
                     f"{_ms(s['itl_ms'])} | {nxt} | {t['memory']['peak_rss_mb']:.0f} MB |")
    if "overload" not in result:
        return "\n".join(lines)
    lines += ["", "| server | sent | 200 | 429 | 5xx | TTFT p50 / p99 | ITL p50 / p99 | goodput | SLO |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for t in result["overload"]["targets"]:
        s, r = t["summary"], t["summary"]["requests"]
        lines.append(f"| {t['label']} | {r['sent']} | {r['ok']} | {r['refused_429']} | "
                     f"{r['server_errors_5xx']} | {_ms(s['ttft_ms'])} | {_ms(s['itl_ms'])} | "
                     f"{s['goodput']['requests_per_s']:.2f} req/s ({100 * s['goodput']['ratio']:.0f}%) | "
                     f"{'pass' if t['pass'] else 'fail'} |")
    return "\n".join(lines)


def main() -> int:
    from loadtests import bench
    from loadtests.report import SLO, table

    if sys.argv[1:2] == ["--markdown"]:
        print(markdown(json.loads(Path(sys.argv[2]).read_text())))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quants", default="bf16,int4", help="variants ramped side by side")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per ramp stage and overload run")
    p.add_argument("--ramp-start", type=float, default=0.25)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--overload-quant", default="int4", help="the variant overloaded ('' to skip)")
    p.add_argument("--overload-server-args", action="append", metavar="ARGS",
                   help="`nibble serve` flags of one overload run; repeatable (default: the "
                   "defaults, then '--max-num-seqs 8 --queue-timeout 1.5')")
    p.add_argument("--slo", default="slo-cpu")
    args = p.parse_args()

    slo = SLO.load(args.slo)
    workload = bench.Workload(api="chat", prompts="short", max_tokens=args.max_tokens)
    date = datetime.date.today().isoformat()
    result: dict = {"benchmark": "load", "date": date, "slo": args.slo}
    with tempfile.TemporaryDirectory(prefix="nibble-load-") as tmp:
        tmp = Path(tmp)
        ramp_opts = bench.Options(profile="ramp", duration=args.duration, ramp_start=args.ramp_start,
                                  workload=workload, slo=slo)
        targets = [(q, ["--model", args.model, "--quant", q]) for q in args.quants.split(",")]
        ramp = bench.run(targets, ramp_opts, tmp / "ramp")
        print(table(ramp["targets"]), flush=True)
        result["ramp"] = ramp
        shutil.copy(tmp / "ramp" / "report.png", RESULTS / f"load-ramp-{date}.png")
        capacity = {t["label"]: t.get("capacity_rps") for t in ramp["targets"]}
        if args.overload_quant and capacity.get(args.overload_quant):
            over_opts = bench.Options(profile="overload", duration=args.duration,
                                      capacity=capacity[args.overload_quant], workload=workload,
                                      slo=slo)
            settings = args.overload_server_args or ["", "--max-num-seqs 8 --queue-timeout 1.5"]
            targets = [(f"{args.overload_quant} {flags or 'defaults'}",
                        ["--model", args.model, "--quant", args.overload_quant, *shlex.split(flags)])
                       for flags in settings]
            over = bench.run(targets, over_opts, tmp / "overload")
            print(table(over["targets"]), flush=True)
            result["overload"] = over
            shutil.copy(tmp / "overload" / "report.png", RESULTS / f"load-overload-{date}.png")
    result["machine"] = result["ramp"]["machine"]
    out = RESULTS / f"load-{date}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
