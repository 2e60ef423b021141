"""lm-eval against `nibble serve`, and its quality ratio next to `nibble compare`'s.

Starts `nibble serve --variants A,B` (default bf16,int4), writes a local rolling-perplexity
task (documents cut from CPython's pydoc_data.topics, the corpus `nibble compare` reads by
default), and runs lm-evaluation-harness's `local-completions` on it against each variant
with nothing but the server's URL (its tokenizer comes from /tokenizer_info). Then the same
server's POST /v1/compare scores the two variants on its own chunks. Reported: each
variant's word perplexity, byte perplexity and bits per byte from lm-eval, with its wall
time; the B/A ratio of lm-eval's word perplexity and the same ratio per token (word
perplexity ratio ** (words / tokens): lm-eval scores every token of each document); and
compare's B/A perplexity ratio, per token, with its 95% interval. The two tools score
different spans (see the README's "Evaluate with lm-eval"), so values differ; the question
is whether the per-token ratios agree. Writes JSON under
benchmarks/results/.

    python benchmarks/lm_eval_ratio.py                       # bf16 vs int4, 8 documents
    python benchmarks/lm_eval_ratio.py --variants bf16,int8 --docs 16
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASK = """\
task: nibble_corpus
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{dir}/docs.jsonl"}}, cache_dir: "{dir}/hf-cache"}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def documents(count: int, words: int) -> list[str]:
    """`count` consecutive runs of `words` words of the built-in corpus, skipping its start."""
    from engine.eval.texts import BUILTIN, corpus_text

    text = corpus_text(BUILTIN)[0].split()
    start = len(text) // 4  # past the index-like head of the topics
    return [" ".join(text[start + i * words:start + (i + 1) * words]) for i in range(count)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 3600) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_ready(url: str, proc: subprocess.Popen, limit: float = 600) -> None:
    deadline = time.time() + limit
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nibble serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError("nibble serve did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variants", default="bf16,int4", help="A,B: the reference, then the one "
                    "measured against it")
    ap.add_argument("--docs", type=int, default=8, help="documents in the task (default 8)")
    ap.add_argument("--words", type=int, default=400, help="words per document (default 400)")
    ap.add_argument("--max-length", type=int, default=1024, help="lm-eval's window in tokens")
    ap.add_argument("--ctx", type=int, default=512, help="compare's chunk length")
    ap.add_argument("--chunks", type=int, default=16, help="compare's chunk count")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    a, b = args.variants.split(",")

    import lm_eval
    from lm_eval.tasks import TaskManager

    from benchmarks.machine import machine_info, write_report

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", args.model,
                               "--variants", args.variants, "--port", str(port),
                               "--max-model-len", str(max(args.max_length, args.ctx) + 16)],
                              cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    rows = {}
    try:
        wait_ready(url, server)
        docs = documents(args.docs, args.words)
        tokens = sum(len(post(url + "/tokenize", {"model": f"{args.model}:{a}", "prompt": d,
                                                  "add_special_tokens": False})["tokens"])
                     for d in docs)
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
            Path(tmp, "task.yaml").write_text(TASK.format(dir=tmp))
            os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
            for variant in (a, b):
                start = time.perf_counter()
                out = lm_eval.simple_evaluate(
                    model="local-completions",
                    model_args=f"base_url={url}/v1/completions,model={args.model}:{variant},"
                               f"max_length={args.max_length}",
                    tasks=["nibble_corpus"], task_manager=TaskManager(include_path=tmp))
                metrics = out["results"]["nibble_corpus"]
                rows[variant] = {k.removesuffix(",none"): round(v, 5) for k, v in metrics.items()
                                 if k.endswith(",none") and "stderr" not in k}
                rows[variant]["seconds"] = round(time.perf_counter() - start, 1)
                print(f"{variant}: {rows[variant]}", file=sys.stderr)
        report_cmp = post(url + "/v1/compare", {"a": f"{args.model}:{a}", "b": f"{args.model}:{b}",
                                                "ctx": args.ctx, "chunks": args.chunks,
                                                "free_running": False})
    finally:
        server.terminate()
        server.wait(60)
    ratio = rows[b]["word_perplexity"] / rows[a]["word_perplexity"]
    per_token = ratio ** (args.docs * args.words / tokens)
    t = report_cmp["teacher_forced"]
    report = {"benchmark": "lm_eval_ratio", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "model": args.model, "a": a, "b": b, "lm_eval_version": lm_eval.__version__,
              "task": {"documents": args.docs, "words_per_document": args.words,
                       "tokens": tokens, "max_length": args.max_length,
                       "output_type": "loglikelihood_rolling",
                       "text": "CPython pydoc_data.topics, consecutive runs of words"},
              "lm_eval": rows, "lm_eval_word_ppl_ratio_b_over_a": round(ratio, 4),
              "lm_eval_token_ppl_ratio_b_over_a": round(per_token, 4),
              "compare": {"ctx": t["ctx"], "chunks": t["chunks"], "ppl_a": t["ppl_a"],
                          "ppl_b": t["ppl_b"], "ppl_ratio": t["ppl_ratio"],
                          "kld_mean": t["kld"]["mean"]},
              "definition": "lm-eval local-completions (rolling loglikelihood over whole "
              "documents, its own windows) against nibble serve, one variant at a time; compare: "
              "POST /v1/compare on the same server (second half of each chunk given the first)",
              "machine": machine_info()}
    lo, hi = t["ppl_ratio"]["ci95"]
    lines = ["| variant | word ppl | byte ppl | bits/byte | seconds |", "|---|---:|---:|---:|---:|"]
    for v in (a, b):
        r = rows[v]
        lines.append(f"| {v} | {r['word_perplexity']:.3f} | {r['byte_perplexity']:.4f} | "
                     f"{r['bits_per_byte']:.4f} | {r['seconds']} |")
    lines.append(f"\n{b}/{a} perplexity, lm-eval: {ratio:.3f} per word, {per_token:.3f} per token "
                 f"({tokens} tokens); nibble compare, per token: "
                 f"{t['ppl_ratio']['value']:.3f} [{lo:.3f}, {hi:.3f}]")
    write_report(report, args.out, f"lm-eval-{b}-vs-{a}", "\n".join(lines))


if __name__ == "__main__":
    main()
