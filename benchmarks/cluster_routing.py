"""Prefix-cache affinity against Ray Serve's default routing, on `nibble serve --ray`.

For each router (pow2: Ray Serve's power-of-two-choices; prefix: nibble's prefix-affinity
router, server/cluster/router.py) this starts `nibble serve --ray --replicas 2 --threads 1
--quant int4 --router R` on a local Ray cluster and sends the same workload: --requests
streamed /v1/completions whose prompts are a shared system prompt of about --system-tokens
tokens (counted with the server's POST /tokenize; deterministic text) followed by a distinct
short question each, --concurrency at a time (closed loop), --max-tokens greedy tokens with
EOS ignored. With --prefixes K there are K distinct system prompts, taken round-robin.

Measured: TTFT p50/p99 at the client (time to each request's first text chunk), wall time
and aggregate output tok/s = requests x max_tokens / wall time, and from the ingress's
/metrics (every replica's series under a `replica` label), read before and after the run:
the prefix-cache hit rate = hit tokens / queried tokens over the run, overall and per replica,
with the requests and tokens each replica served. A few short warm-up requests (shorter than
one KV block, so they touch no system prompt's blocks) go first and are not counted. Writes
JSON under benchmarks/results/ (or --out) with the per-router results and prefix/pow2 ratios.

    python benchmarks/cluster_routing.py                     # 1 shared prefix, 64 requests
    python benchmarks/cluster_routing.py --prefixes 4 --out benchmarks/results/cluster-routing-4prefixes-$(date +%F).json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import random
import shlex
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine_info, write_report  # noqa: E402
from benchmarks.peers import TOPICS  # noqa: E402
from benchmarks.serve import pct, stream_requests  # noqa: E402
from loadtests.bench import discover_model, nibble_server, safe_name, scrape, wait_idle  # noqa: E402

ROUTERS = ("pow2", "prefix")
LOGS = Path(tempfile.gettempdir()) / "nibble-cluster-bench"
SENTENCES = [
    "The assistant answers questions about the warehouse inventory system.",
    "Every answer must be short, polite and factually grounded in the records below.",
    "Orders are shipped from the northern depot on weekdays before noon.",
    "Returned items are inspected within three business days of arrival.",
    "Customers with a premium account receive free expedited delivery.",
    "Fragile goods are packed in double-walled boxes with recycled padding.",
    "The southern depot handles bulk orders above two hundred kilograms.",
    "Invoices are issued in the currency of the delivery address.",
    "A damaged parcel must be photographed before it is opened.",
    "Stock levels are reconciled with the ledger every night at midnight.",
    "Refunds are paid to the original payment method within a week.",
    "The support line is staffed from eight in the morning to six in the evening.",
    "Seasonal items are stored on the upper shelves of aisle fourteen.",
    "Hazardous materials require a signed declaration from the sender.",
    "Delivery drivers scan every parcel at pickup and at the door.",
    "Gift wrapping is available for orders placed at least two days ahead.",
    "Backordered products are reserved in the order they were requested.",
    "The catalogue is updated on the first Monday of each month.",
    "Discount codes cannot be combined with clearance prices.",
    "International shipments include a customs form printed at packing.",
]
COUNTERS = {  # what each replica served, from its nibble metrics
    "requests": "nibble_requests_finished_total",
    "prompt_tokens": "nibble_prompt_tokens_total",
    "generation_tokens": "nibble_generation_tokens_total",
    "hit_tokens": "nibble_prefix_cache_hit_tokens_total",
    "queried_tokens": "nibble_prefix_cache_queried_tokens_total",
}


def versions() -> dict:
    import torch

    out = {"torch": torch.__version__}
    for dist in ("nibble", "ray"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def drive(url: str, bodies: list[dict], concurrency: int, max_tokens: int) -> dict:
    """The bodies sent as streamed /v1/completions (benchmarks.serve.stream_requests, one at a
    time per worker, each on a new loopback connection), `concurrency` at once in a closed
    loop; the wall time, each request's TTFT (in the bodies' order) and output tok/s =
    len(bodies) x max_tokens / wall time."""
    async def run() -> tuple[float, list[float]]:
        ttft: list[float] = [0.0] * len(bodies)
        todo = iter(enumerate(bodies))

        async def worker():
            for i, body in todo:
                ttft[i] = (await stream_requests(url, [body], max_tokens))["ttft_s"][0]

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))
        return time.perf_counter() - t0, ttft

    wall, ttft = asyncio.run(run())
    return {"wall_s": wall, "ttft_s": ttft, "tok_per_s": len(bodies) * max_tokens / wall}


def summary(run: dict) -> dict:
    ttft = run["ttft_s"]
    return {"wall_s": round(run["wall_s"], 3), "tok_per_s": round(run["tok_per_s"], 2),
            "ttft_p50_s": round(pct(ttft, 0.5), 4), "ttft_p99_s": round(pct(ttft, 0.99), 4),
            "ttft_mean_s": round(sum(ttft) / len(ttft), 4)}


def by_replica(url: str) -> dict[str, dict[str, float]]:
    """{replica id: {counter key: value summed over its other labels}} from the ingress's
    /metrics (every replica's series carry a `replica` label)."""
    return {replica: {key: row.get(name, 0.0) for key, name in COUNTERS.items()}
            for replica, row in scrape(url, by="replica").items()}


def _rate(hit: float, queried: float) -> float | None:
    return round(hit / queried, 4) if queried else None


def tokenize(url: str, model: str, text: str) -> int:
    req = urllib.request.Request(f"{url}/tokenize", json.dumps({"model": model, "prompt": text}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())["count"]


def system_prompt(url: str, model: str, k: int, tokens: int, seed: int) -> tuple[str, int]:
    """The k-th system prompt: a distinct first line, then sentences in an order drawn from
    (seed, k), added until /tokenize counts at least `tokens` tokens; (text, token count)."""
    rng = random.Random(seed * 1000 + k)
    text = f"System prompt {k + 1}: instructions for the support assistant of depot {k + 1}."
    count = tokenize(url, model, text)
    while count < tokens:
        text += " " + rng.choice(SENTENCES)
        count = tokenize(url, model, text)
    return text, count


def bodies(systems: list[str], model: str, n: int) -> list[dict]:
    """n prompts: system prompt i mod K, then a question no other request asks."""
    return [{"model": model, "temperature": 0,
             "prompt": f"{systems[i % len(systems)]}\n\nQuestion {i + 1}: what should a customer "
                       f"know about {TOPICS[i % len(TOPICS)]}?\nAnswer:"} for i in range(n)]


def measure(router: str, args) -> dict:
    serve_args = ["--model", args.model, "--quant", args.quant, "--ray", "--replicas",
                  str(args.replicas), "--threads", str(args.threads), "--router", router,
                  *args.serve_args]
    if args.ray_address:
        serve_args += ["--ray-address", args.ray_address]
    log = args.logs / f"cluster-routing-{safe_name(router)}-server.log"
    print(f"{router}: starting nibble serve {' '.join(serve_args)} (log {log})", file=sys.stderr)
    with nibble_server(router, serve_args, log) as target:
        model = discover_model(target, "")
        systems = [system_prompt(target.url, model, k, args.system_tokens, args.seed)
                   for k in range(args.prefixes)]
        work = bodies([s for s, _ in systems], model, args.requests)
        # warm-up: short prompts (no whole KV block), enough at once to reach every replica
        warm = [{"model": model, "prompt": f"Warm up {i}.", "temperature": 0}
                for i in range(2 * args.replicas)]
        asyncio.run(stream_requests(target.url, warm, 4))
        warmed = sorted(r for r, row in by_replica(target.url).items() if row["requests"])
        before, per_before = wait_idle(target.url), by_replica(target.url)
        run = drive(target.url, work, args.concurrency, args.max_tokens)
        after, per_after = wait_idle(target.url), by_replica(target.url)
    delta = {k: after.get(v, 0.0) - before.get(v, 0.0) for k, v in COUNTERS.items()}
    replicas = {}
    for rid in sorted(per_after):
        d = {k: per_after[rid][k] - per_before.get(rid, {}).get(k, 0.0) for k in COUNTERS}
        replicas[rid] = {k: int(v) for k, v in d.items()} | {
            "hit_rate": _rate(d["hit_tokens"], d["queried_tokens"])}
    result = {"router": router, "serve_args": serve_args,
              "system_prompt_tokens": [c for _, c in systems],
              "warmed_replicas": len(warmed), **summary(run),
              "prefix_cache_hit_rate": _rate(delta["hit_tokens"], delta["queried_tokens"]),
              "totals": {k: int(v) for k, v in delta.items()}, "replicas": replicas,
              "ttft_s": [round(t, 4) for t in run["ttft_s"]]}
    if delta["requests"] != args.requests:
        result["note"] = (f"the replicas' metrics count {int(delta['requests'])} finished "
                          f"requests for the {args.requests} sent")
    print(f"{router}: hit rate {result['prefix_cache_hit_rate']}, TTFT p50 "
          f"{result['ttft_p50_s']:.3f} s p99 {result['ttft_p99_s']:.3f} s, "
          f"{result['tok_per_s']:.1f} tok/s, requests per replica "
          f"{[r['requests'] for r in replicas.values()]}", file=sys.stderr)
    return result


def add_common_args(ap: argparse.ArgumentParser, name: str) -> None:
    """The flags both cluster benchmarks take (benchmarks/cluster_cost.py too)."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--ray-address", help="join this Ray cluster (default: a local one per server)")
    ap.add_argument("--serve-args", default="", type=shlex.split, metavar="'ARGS'",
                    help="more `nibble serve` flags for every server, one quoted string, e.g. "
                    "--serve-args='--kv-cache-memory 2e8'")
    ap.add_argument("--logs", type=Path, default=LOGS, help="server logs (default %(default)s)")
    ap.add_argument("--out", type=Path, help=f"JSON path (default benchmarks/results/{name}-<date>.json)")


def pick(ap: argparse.ArgumentParser, flag: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma-separated list of names from `allowed`, in the order given."""
    names = value.split(",")
    for n in names:
        if n not in allowed:
            ap.error(f"{flag}: {n!r} is not one of {', '.join(allowed)}")
    return names


def report_head(name: str, args: argparse.Namespace) -> dict:
    """The facts every cluster benchmark's JSON starts with."""
    return {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(), "versions": versions(),
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}


def ratios(a: dict, b: dict) -> dict:
    """a / b for the headline numbers (None where b is 0 or missing)."""
    keys = ("prefix_cache_hit_rate", "ttft_p50_s", "ttft_p99_s", "ttft_mean_s", "wall_s",
            "tok_per_s")
    return {k: round(a[k] / b[k], 3) if a.get(k) is not None and b.get(k) else None for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, "cluster-routing")
    ap.add_argument("--routers", default=",".join(ROUTERS), help="comma-separated, run in order")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="per replica")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--system-tokens", type=int, default=1000, help="tokens per system prompt")
    ap.add_argument("--prefixes", type=int, default=1, help="distinct system prompts, round-robin")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    routers = pick(ap, "--routers", args.routers, ROUTERS)
    if min(args.requests, args.concurrency, args.max_tokens, args.prefixes, args.replicas,
           args.threads) < 1:
        ap.error("--requests, --concurrency, --max-tokens, --prefixes, --replicas and --threads "
                 "must be at least 1")

    results = {r: measure(r, args) for r in routers}
    report = report_head("cluster-routing", args) | {
              "definition": "per router, one `nibble serve --ray` with `replicas` replicas; "
              "`requests` streamed /v1/completions, prompt = system prompt (i mod prefixes) + a "
              "distinct question, `concurrency` at once (closed loop), max_tokens greedy tokens "
              "with EOS ignored; TTFT at the client; tok/s = requests x max_tokens / wall time; "
              "prefix_cache_hit_rate = delta nibble_prefix_cache_hit_tokens_total / delta "
              "nibble_prefix_cache_queried_tokens_total over the run, summed over replicas "
              "(per replica under `replicas`)",
              "results": results}
    if "prefix" in results and "pow2" in results:
        report["prefix_vs_pow2"] = ratios(results["prefix"], results["pow2"])
    lines = ["| router | hit rate | TTFT p50 / p99 (s) | wall (s) | tok/s | requests per replica |",
             "|---|---:|---:|---:|---:|---|"]
    for r, res in results.items():
        rate = res["prefix_cache_hit_rate"]
        lines.append(f"| {r} | {'n/a' if rate is None else f'{rate:.1%}'} | "
                     f"{res['ttft_p50_s']:.3f} / {res['ttft_p99_s']:.3f} | {res['wall_s']:.1f} | "
                     f"{res['tok_per_s']:.1f} | "
                     f"{', '.join(str(x['requests']) for x in res['replicas'].values())} |")
    if "prefix_vs_pow2" in report:
        q = report["prefix_vs_pow2"]

        def cell(k):
            return "n/a" if q[k] is None else f"{q[k]:.2f}x"

        lines.append(f"| prefix / pow2 | {cell('prefix_cache_hit_rate')} | {cell('ttft_p50_s')} / "
                     f"{cell('ttft_p99_s')} | {cell('wall_s')} | {cell('tok_per_s')} | |")
    write_report(report, args.out, "cluster-routing", "\n".join(lines))


if __name__ == "__main__":
    main()
