"""What the HTTP server costs: streamed completions through `nibble serve` against the same
requests given to the engine directly, in one run, on the same loaded model and thread.

For each concurrency c, c requests with distinct 128-token prompts (token ids, so both sides
see the same tokens) generate 128 tokens each, EOS ignored, greedy. Baseline: one
`LLM.generate` call over the c prompts on the server's engine thread while it is idle (the
thread that loaded the model, as in `nibble serve`). Server: the same LLM served by that
in-process server (engine thread + event loop), driven by a separate client process that
opens c streaming /v1/completions requests at once over loopback; it records each request's
time to first token and the gaps between chunks. Output tok/s = c x 128 / wall time. Each
round runs both sides back to back, in alternating order (engine first in odd rounds, server
first in even ones) so that a machine that slows or speeds up during the run does not favour
one side; the reported ratio is the median of the rounds' own server/engine ratios, with
their range (a shared machine's speed drifts by more than the server's cost between rounds,
so a ratio of two medians taken minutes apart says little). Writes JSON under
benchmarks/results/.

    python benchmarks/serve.py                        # int4, c = 1 and 16, 3 rounds
    python benchmarks/serve.py --quant bf16 --concurrency 1,4,16 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


async def stream_requests(url: str, bodies: list[dict], new_tokens: int) -> dict:
    """All bodies POSTed to url + /v1/completions at once, streamed (each asks for new_tokens
    tokens with EOS ignored); the wall time, each request's time to first token and the gaps
    between chunks. Works against any OpenAI-compatible server (nibble, llama-server, vLLM)."""
    import aiohttp

    async def one(session, body):
        body = {**body, "max_tokens": new_tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        stamps, tokens = [], None
        async with session.post(url + "/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if event.get("choices") and event["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
        assert tokens in (None, new_tokens), tokens  # a server that reports usage must agree
        return start, stamps

    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        t0 = time.perf_counter()
        per = await asyncio.gather(*(one(session, b) for b in bodies))
        wall = time.perf_counter() - t0
    ttft = [stamps[0] - start for start, stamps in per]
    gaps = [b - a for _, stamps in per for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"wall_s": wall, "ttft_s": ttft, "chunk_gap_s": gaps}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--client", help=argparse.SUPPRESS)  # internal: run as the client process
    args = ap.parse_args()
    if args.client:
        bodies = json.loads(sys.stdin.read())
        print(json.dumps(asyncio.run(stream_requests(args.client, bodies, args.new_tokens))))
        return

    from benchmarks.machine import machine_info, write_report
    from engine import LLM, SamplingParams
    from engine.eval.texts import BUILTIN, corpus_chunks, corpus_text
    from server.app import ServerSettings, ServerThread
    from server.async_engine import Variant

    levels = [int(c) for c in args.concurrency.split(",")]
    name = f"{args.model}:{args.quant}"

    def load() -> list[Variant]:  # on the server's engine thread, as `nibble serve` loads
        llm = LLM(args.model, quant=args.quant, progress=False, max_num_seqs=max(levels),
                  max_model_len=args.prompt_tokens + args.new_tokens)
        return [Variant(name, args.model, args.quant, llm)]

    server = ServerThread(load, ServerSettings(port=0, max_queued=max(levels)))
    llm = server.server.state.variants[0].llm
    chunks = iter(corpus_chunks(llm.tokenizer, corpus_text(BUILTIN)[0], args.prompt_tokens,
                                2 + 2 * args.rounds * sum(levels)))
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    warm = [next(chunks) for _ in range(2)]
    server.on_engine_thread(lambda: llm.generate(warm, SamplingParams(max_tokens=4)))

    def direct(prompts) -> float:  # the engine alone, on the thread that serves
        def run() -> float:
            start = time.perf_counter()
            llm.generate(prompts, params)
            return len(prompts) * args.new_tokens / (time.perf_counter() - start)

        return server.on_engine_thread(run)

    def served(prompts) -> dict:
        proc = subprocess.run([sys.executable, __file__, "--client", server.url,
                               "--new-tokens", str(args.new_tokens)],
                              input=json.dumps([{"prompt": p, "temperature": 0} for p in prompts]),
                              capture_output=True, text=True, check=True)
        out = json.loads(proc.stdout)
        out["tok_per_s"] = len(prompts) * args.new_tokens / out["wall_s"]
        return out

    runs = {c: {"engine": [], "server": []} for c in levels}
    try:
        for r in range(args.rounds):
            for c in levels:
                sides = [("engine", direct), ("server", served)]
                for side, fn in sides if r % 2 == 0 else sides[::-1]:
                    runs[c][side].append(fn([next(chunks) for _ in range(c)]))
                print(f"round {r + 1}/{args.rounds} x{c:<3} engine {runs[c]['engine'][-1]:6.1f} "
                      f"server {runs[c]['server'][-1]['tok_per_s']:6.1f} tok/s", file=sys.stderr)
    finally:
        server.stop()
    rows = []
    for c in levels:
        eng = statistics.median(runs[c]["engine"])
        srv = statistics.median(r["tok_per_s"] for r in runs[c]["server"])
        ratios = [s["tok_per_s"] / e for s, e in zip(runs[c]["server"], runs[c]["engine"],
                                                      strict=True)]
        ttft = [t for r in runs[c]["server"] for t in r["ttft_s"]]
        gaps = [g for r in runs[c]["server"] for g in r["chunk_gap_s"]]
        rows.append({"concurrency": c, "engine_tok_per_s": round(eng, 1),
                     "server_tok_per_s": round(srv, 1),
                     "server_vs_engine": round(statistics.median(ratios), 3),
                     "server_vs_engine_rounds": [round(v, 3) for v in ratios],
                     "engine_runs": [round(v, 1) for v in runs[c]["engine"]],
                     "server_runs": [round(r["tok_per_s"], 1) for r in runs[c]["server"]],
                     "ttft_p50_s": round(pct(ttft, 0.5), 4), "ttft_p99_s": round(pct(ttft, 0.99), 4),
                     "itl_p50_s": round(pct(gaps, 0.5), 4), "itl_p99_s": round(pct(gaps, 0.99), 4)})
    report = {"benchmark": "serve", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "model": args.model, "quant": args.quant, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "rounds": args.rounds,
              "definition": "c streamed /v1/completions requests from a separate client process "
              "over loopback vs one LLM.generate call over the same kind of prompts; output "
              "tokens / wall time, medians over rounds; server_vs_engine is the median of each round's "
              "own ratio (both sides back to back, order alternating by round); TTFT and chunk gaps measured "
              "by the client", "machine": machine_info(), "results": rows}
    lines = ["| concurrency | engine tok/s | server tok/s | server / engine (rounds' range) | "
             "TTFT p50 / p99 (s) | ITL p50 / p99 (ms) |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['engine_tok_per_s']} | {r['server_tok_per_s']} | "
                     f"{r['server_vs_engine']:.2f}x ({min(r['server_vs_engine_rounds']):.2f}-"
                     f"{max(r['server_vs_engine_rounds']):.2f}) | {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
                     f"{1000 * r['itl_p50_s']:.0f} / {1000 * r['itl_p99_s']:.0f} |")
    write_report(report, args.out, f"serve-{args.quant}", "\n".join(lines))


if __name__ == "__main__":
    main()
