"""nibble against the other servers a user could run on this machine: llama.cpp's
llama-server and vLLM's CPU backend, one after another, driven by one client.

Every server gets the same requests: streamed /v1/completions, "Write a long paragraph about
X." prompts, 128 greedy tokens each with EOS ignored, c requests at once (c = 1, 4, 16, 32).
Aggregate output tok/s = c x 128 / wall time of the wave; TTFT is the client's time to each
request's first text chunk. Servers run alone, in turn, so they never share the 2 cores;
absolute numbers move with the machine's load, the ratios in one run are what to read.
Also measured, each in a fresh process: nibble's in-process `LLM.generate` (the engine without
HTTP) at 1 and 16 prompts, and llama-bench tg128 on the same GGUF file.

benchmarks/peers/setup.sh builds the peers (not run by CI); a peer it has not built is
recorded as missing with the reason. Writes JSON and a PNG under benchmarks/results/.

    python benchmarks/peers.py                           # everything that is built
    python benchmarks/peers.py --servers nibble-int4,llama-server --levels 1,16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import RESULTS, machine_info, write_report  # noqa: E402
from benchmarks.serve import pct, stream_requests  # noqa: E402
from loadtests.bench import stop_process  # noqa: E402

BUILD = ROOT / "benchmarks" / "peers" / "build"
LLAMA_BIN = BUILD / "llama.cpp" / "bin"
VLLM_VENV = BUILD / "vllm-venv"
VLLM_MODEL = BUILD / "smollm2-135m-hf"
TOPICS = ["the ocean", "mountains", "a city at night", "trains", "bread", "winter", "bees",
          "libraries", "rivers", "the moon", "chess", "gardens", "bicycles", "rain", "music",
          "deserts", "lighthouses", "maps", "volcanoes", "tea", "forests", "bridges", "owls",
          "clocks", "islands", "paper", "storms", "markets", "glass", "kites", "caves",
          "harbors", "snow", "salt", "windmills", "letters"]


def prompts(n: int, offset: int = 0) -> list[str]:
    return [f"Write a long paragraph about {TOPICS[(offset + i) % len(TOPICS)]}."
            for i in range(n)]


@dataclass
class Server:
    name: str
    cmd: list[str]
    model: str  # the request's "model" field
    env: dict[str, str] = field(default_factory=dict)
    missing: str | None = None  # why it cannot run here
    cwd: str | None = None  # where it runs (`python -m` imports nibble from there)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def servers(args, port: int) -> dict[str, Server]:
    py = sys.executable
    nibble = [py, "-m", "server.cli", "serve", "--model", args.model, "--port", str(port),
              "--max-num-seqs", str(max(args.levels)), "--max-model-len", "512"]
    out = {
        "nibble-int4": Server("nibble int4", [*nibble, "--quant", "int4"], args.model),
        "nibble-int4-fp32act": Server("nibble int4, fp32 decode activations",
                                      [*nibble, "--quant", "int4", "--decode-activations", "fp32"],
                                      args.model),
        "nibble-bf16": Server("nibble bf16", [*nibble, "--quant", "bf16"], args.model),
        "nibble-w8a8": Server("nibble w8a8", [*nibble, "--quant", "w8a8"], args.model),
        "nibble-int4-lmhead8": Server("nibble int4, lm_head int8",
                                      [*nibble, "--quant", "int4", "--rule", "lm_head=int8"],
                                      args.model),
    }
    if args.baseline:  # the same servers from another checkout (an earlier commit)
        for quant in ("int4", "bf16"):
            out[f"baseline-{quant}"] = Server(
                f"nibble {quant} ({args.baseline_label})", [*nibble, "--quant", quant],
                args.model, cwd=str(args.baseline))
    gguf = model_file(args.model)
    slots = max(args.levels)
    server_bin = LLAMA_BIN / "llama-server"
    out["llama-server"] = Server(
        "llama.cpp llama-server (Q4_1 file)", [str(server_bin), "-m", str(gguf), "-t", str(args.threads),
                                   "-np", str(slots), "-c", str(slots * 512), "-cb",
                                   "--port", str(port), "--host", "127.0.0.1"],
        "default", missing=None if server_bin.exists() else "not built (setup.sh llama)")
    vpy = VLLM_VENV / "bin" / "python"
    preload = [p for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                           str(VLLM_VENV / "lib" / "libiomp5.so")) if Path(p).exists()]
    for bind in ("auto", "0-1"):  # auto computes on one of 2 cores; 0-1 on both
        out[f"vllm-{bind}"] = Server(
            f"vLLM CPU bf16 (bind {bind})",
            [str(vpy), "-m", "vllm.entrypoints.openai.api_server", "--model", str(VLLM_MODEL),
             "--served-model-name", "smollm2", "--dtype", "bfloat16", "--port", str(port),
             "--max-num-seqs", str(slots), "--max-model-len", "512"],
            "smollm2", env={"VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_KVCACHE_SPACE": "2",
                            "LD_PRELOAD": ":".join(preload)},
            missing=None if vpy.exists() and (VLLM_MODEL / "config.json").exists()
            else "not installed (setup.sh vllm)")
    return out


def model_file(alias: str) -> Path:
    from engine import hub

    return hub.resolve_model(alias, progress=False).path


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except Exception:  # noqa: BLE001 - not up yet
        return 0


def run_server(s: Server, port: int, args) -> dict:
    url = f"http://127.0.0.1:{port}"
    BUILD.mkdir(parents=True, exist_ok=True)
    log = open(BUILD / f"{s.name.split()[0]}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(s.cmd, env={**os.environ, **s.env}, stdout=log,
                            stderr=subprocess.STDOUT, cwd=s.cwd or ROOT)
    try:
        deadline = time.monotonic() + args.start_timeout
        while _get(url + "/v1/models") != 200 or _get(url + "/health") not in (200, 404):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = Path(log.name).read_text()[-2000:]
                return {"error": f"did not start (exit {proc.poll()}): {tail}"}
            time.sleep(1)
        body = lambda p: {"model": s.model, "prompt": p, "temperature": 0}  # noqa: E731
        asyncio.run(stream_requests(url, [body(p) for p in prompts(2)], 8))  # warm-up
        rows, offset = [], 0
        for c in args.levels:
            waves = []
            for _ in range(args.rounds):
                waves.append(asyncio.run(stream_requests(
                    url, [body(p) for p in prompts(c, offset)], args.new_tokens)))
                offset += c
            tps = [c * args.new_tokens / w["wall_s"] for w in waves]
            ttft = [t for w in waves for t in w["ttft_s"]]
            rows.append({"concurrency": c, "tok_per_s": round(statistics.median(tps), 1),
                         "runs": [round(t, 1) for t in tps],
                         "ttft_p50_s": round(pct(ttft, 0.5), 3),
                         "ttft_p99_s": round(pct(ttft, 0.99), 3)})
            print(f"{s.name:32} x{c:<3} {rows[-1]['tok_per_s']:7.1f} tok/s  TTFT p50 "
                  f"{rows[-1]['ttft_p50_s']:.2f} s", file=sys.stderr)
        return {"results": rows}
    finally:
        stop_process(proc)
        log.close()


def engine_speed(args) -> dict:
    """nibble's LLM.generate in the main thread of a fresh process, int4, 1 and 16 prompts."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(ROOT)!r})
from benchmarks.peers import prompts
from engine import LLM, SamplingParams
llm = LLM({args.model!r}, quant="int4", progress=False, max_num_seqs=32, max_model_len=512)
p = SamplingParams(max_tokens={args.new_tokens}, temperature=0, ignore_eos=True)
llm.generate(prompts(2), SamplingParams(max_tokens=8))
out = {{}}
for c in (1, 16):
    runs = []
    for r in range({args.rounds}):
        t = time.perf_counter(); llm.generate(prompts(c, r * c), p)
        runs.append(c * {args.new_tokens} / (time.perf_counter() - t))
    out[c] = runs
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, check=True)
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    return {f"int4_x{c}_tok_per_s": round(statistics.median(v), 1) for c, v in runs.items()}


def llama_bench(args) -> dict:
    exe = LLAMA_BIN / "llama-bench"
    if not exe.exists():
        return {"error": "not built (setup.sh llama)"}
    proc = subprocess.run([str(exe), "-m", str(model_file(args.model)), "-t", str(args.threads),
                           "-p", "0", "-n", str(args.new_tokens), "-o", "json"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    rows = json.loads(proc.stdout)
    return {f"tg{args.new_tokens}_tok_per_s": round(rows[0]["avg_ts"], 1),
            "build": rows[0].get("build_commit"), "cpu_info": rows[0].get("cpu_info")}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in report["servers"]:
        rows = s.get("results")
        if not rows:
            continue
        cs = [r["concurrency"] for r in rows]
        a.plot(cs, [r["tok_per_s"] for r in rows], marker="o", label=s["name"])
        line = b.plot(cs, [r["ttft_p50_s"] for r in rows], marker="o", label=f"{s['name']} p50")
        b.plot(cs, [r["ttft_p99_s"] for r in rows], ls="--", color=line[0].get_color())
    for ax, title in ((a, "aggregate output tok/s"), (b, "TTFT (s): p50 solid, p99 dashed")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    fig.suptitle(f"{report['model']}, {report['new_tokens']} tokens per request, "
                 f"{report['machine'].get('cpu', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--servers", default="nibble-int4,nibble-int4-fp32act,nibble-bf16,nibble-w8a8,"
                    "nibble-int4-lmhead8,"
                    "llama-server,vllm-auto,vllm-0-1")
    ap.add_argument("--levels", default="1,4,16,32", type=lambda v: [int(c) for c in v.split(",")])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1, help="waves per level (median reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads")
    ap.add_argument("--start-timeout", type=float, default=600)
    ap.add_argument("--baseline", type=Path, help="another checkout of nibble (e.g. `git worktree "
                    "add DIR COMMIT`): adds servers baseline-int4 and baseline-bf16 run from it")
    ap.add_argument("--baseline-label", default="baseline", help="their name in the table")
    ap.add_argument("--no-extras", action="store_true",
                    help="skip the in-process engine and llama-bench measurements")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    RESULTS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    table = servers(args, port)
    report = {"benchmark": "peers", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "model": args.model, "new_tokens": args.new_tokens, "levels": args.levels,
              "rounds": args.rounds, "machine": machine_info(),
              "definition": "c streamed /v1/completions requests at once from one client "
              "process, 'Write a long paragraph about X.', greedy, EOS ignored; aggregate "
              "output tok/s = c x new_tokens / wall time; servers run one after another",
              "servers": []}
    for key in args.servers.split(","):
        s = table[key]
        entry = {"key": key, "name": s.name, "cmd": " ".join(Path(c).name if "/" in c else c
                                                             for c in s.cmd)}
        entry.update({"error": s.missing} if s.missing else run_server(s, port, args))
        if "error" in entry:
            print(f"{s.name}: {entry['error'][:300]}", file=sys.stderr)
        report["servers"].append(entry)
    if not args.no_extras:
        report["engine_in_process"] = engine_speed(args)
        report["llama_bench"] = llama_bench(args)
    lines = ["| server | " + " | ".join(f"{c} stream{'s' if c > 1 else ''}, tok/s"
                                        for c in args.levels) + " |",
             "|---|" + "---:|" * len(args.levels)]
    for s in report["servers"]:
        cells = [str(r["tok_per_s"]) for r in s.get("results", [])] or \
            ["n/a"] * len(args.levels)
        lines.append(f"| {s['name']} | " + " | ".join(cells) + " |")
    out = write_report(report, args.out, "peers", "\n".join(lines))
    plot(report, out.with_suffix(".png"))
    print(json.dumps({k: report.get(k) for k in ("engine_in_process", "llama_bench")}),
          file=sys.stderr)


if __name__ == "__main__":
    main()
