"""What the Ray path costs: `nibble serve --ray --replicas 1` against plain `nibble serve` on
the same machine, one engine each, with the same threads.

Targets, one after another: plain (`nibble serve --quant int4`, all cores unless --threads)
and ray (`nibble serve --ray --replicas 1 --quant int4 --threads T`, T = --threads or all
cores, on a local Ray cluster: the ingress process relays each request to the replica
through a Ray Serve handle). For each concurrency c (default 1 and 16): N streamed
/v1/completions ("Write a long paragraph about X.", distinct within a level), c at once in a
closed loop, --max-tokens greedy tokens each with EOS ignored; N = --requests, or --waves x c
(at least 4). One warm-up request per server first. Reported per level: TTFT p50/p99 at the
client and aggregate output tok/s = N x max_tokens / wall time, and ray / plain ratios.
Writes JSON under benchmarks/results/ (or --out).

    python benchmarks/cluster_cost.py                          # c = 1 and 16, 2 waves each
    python benchmarks/cluster_cost.py --concurrency 1,4,16 --waves 4 --max-tokens 128
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cluster_routing import add_common_args, drive, pick, report_head, summary  # noqa: E402
from benchmarks.machine import write_report  # noqa: E402
from benchmarks.peers import prompts  # noqa: E402
from loadtests.bench import Workload, discover_model, nibble_server, safe_name, warm_up  # noqa: E402

TARGETS = ("plain", "ray")


def serve_args(target: str, args) -> list[str]:
    base = ["--model", args.model, "--quant", args.quant, *args.serve_args]
    if target == "plain":
        return base + (["--threads", str(args.threads)] if args.threads else [])
    out = base + ["--ray", "--replicas", "1", "--threads", str(args.threads or os.cpu_count())]
    return out + (["--ray-address", args.ray_address] if args.ray_address else [])


def measure(name: str, args) -> dict:
    cmd = serve_args(name, args)
    log = args.logs / f"cluster-cost-{safe_name(name)}-server.log"
    print(f"{name}: starting nibble serve {' '.join(cmd)} (log {log})", file=sys.stderr)
    rows = []
    with nibble_server(name, cmd, log) as target:
        target.model = discover_model(target, "")
        warm_up(target, Workload(max_tokens=args.max_tokens), requests=1)
        for c in args.concurrency:
            n = args.requests or max(4, args.waves * c)
            bodies = [{"model": target.model, "prompt": p, "temperature": 0} for p in prompts(n)]
            row = {"concurrency": c, "requests": n,
                   **summary(drive(target.url, bodies, c, args.max_tokens))}
            rows.append(row)
            print(f"{name:6} x{c:<3} {row['tok_per_s']:7.1f} tok/s  TTFT p50 "
                  f"{row['ttft_p50_s']:.3f} s", file=sys.stderr)
    return {"target": name, "serve_args": cmd, "results": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, "cluster-cost")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, run in order")
    ap.add_argument("--concurrency", default="1,16",
                    type=lambda v: [int(c) for c in v.split(",")])
    ap.add_argument("--waves", type=int, default=2, help="requests per level = waves x c (>= 4)")
    ap.add_argument("--requests", type=int, help="requests per level (instead of --waves)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, help="engine threads for both (default: all cores; "
                    f"the ray replica is given --threads {os.cpu_count()})")
    args = ap.parse_args()
    targets = pick(ap, "--targets", args.targets, TARGETS)
    if min(args.concurrency) < 1 or args.waves < 1 or args.max_tokens < 1 or \
            (args.requests is not None and args.requests < 1):
        ap.error("--concurrency, --waves, --requests and --max-tokens must be at least 1")

    results = {t: measure(t, args) for t in targets}
    report = report_head("cluster-cost", args) | {
              "definition": "per target, one server with one engine; per concurrency c, N "
              "streamed /v1/completions c at once (closed loop), max_tokens greedy tokens with "
              "EOS ignored; TTFT at the client; tok/s = N x max_tokens / wall time; targets "
              "run one after another",
              "results": results}
    if "plain" in results and "ray" in results:
        report["ray_vs_plain"] = [
            {"concurrency": p["concurrency"],
             "ttft_p50": round(r["ttft_p50_s"] / p["ttft_p50_s"], 3),
             "tok_per_s": round(r["tok_per_s"] / p["tok_per_s"], 3)}
            for p, r in zip(results["plain"]["results"], results["ray"]["results"], strict=True)]
    lines = ["| target | concurrency | requests | TTFT p50 / p99 (s) | tok/s |",
             "|---|---:|---:|---:|---:|"]
    for t, res in results.items():
        for r in res["results"]:
            lines.append(f"| {t} | {r['concurrency']} | {r['requests']} | {r['ttft_p50_s']:.3f} / "
                         f"{r['ttft_p99_s']:.3f} | {r['tok_per_s']:.1f} |")
    for q in report.get("ray_vs_plain", []):
        lines.append(f"| ray / plain | {q['concurrency']} | | {q['ttft_p50']:.2f}x (p50) | "
                     f"{q['tok_per_s']:.2f}x |")
    write_report(report, args.out, "cluster-cost", "\n".join(lines))


if __name__ == "__main__":
    main()
