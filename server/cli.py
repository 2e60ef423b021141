"""The `nibble` command line: serve, generate, chat, quantize, inspect, compare, plan, bench."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from engine.config import EngineConfig, rules_from_config
from engine.config_files import read_config
from engine.errors import ConfigError, NibbleError

DESCRIPTION = """\
nibble runs quantized LLMs. Point it at a model (an alias such as smollm2-135m, a Hugging Face
directory, a .gguf file, or a checkpoint saved by `nibble quantize`) and choose how its linear
layers are stored: fp32, bf16, fp16, int8, int4 (-g32/-g64/-g128, -sym), nf4 or w8a8. lm_head,
embeddings and norms stay 16-bit unless a --rule names them."""

QUANT_HELP = ("storage of the linear layers: fp32, bf16, fp16, int8 (per channel; int8-g32 "
              "group-wise), int4 (group 128; int4-g32, int4-g64, int4-sym), nf4 (group 64), "
              "w8a8 (int8 weights per channel and int8 activations per token; `nibble quantize "
              "--method smoothquant` first where activations have outliers), or "
              "gguf: a GGUF file on its own blocks (Q4_0/Q4_1 as int4-g32, Q8_0 as int8-g32, "
              "K-quants dequantized and requantized). Default: bf16, or what a pre-quantized "
              "checkpoint holds")
RULE_HELP = ("per-module override REGEX=FORMAT, searched in the module name "
             "(e.g. 'self_attn\\..*=int8', 'mlp\\..*=int4', 'lm_head=int8'); repeatable, first match wins")


def _calib_args(g, tokens: int, ctx: int, scored: str) -> None:
    g.add_argument("--calib", default="builtin", metavar="FILE|builtin", help="calibration text "
                   "(default: docstrings of Python's standard library, apart from the text "
                   "`nibble compare` measures on)")
    g.add_argument("--calib-tokens", type=int, default=tokens, help="calibration tokens, in "
                   f"chunks of --calib-ctx{scored} (default {tokens})")
    g.add_argument("--calib-ctx", type=int, default=ctx, help=f"tokens per calibration chunk "
                   f"(default {ctx})")


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", help="alias, HF directory, .gguf file or nibble checkpoint "
                   "(default: smollm2-135m)")
    g.add_argument("--quant", "-q", help=QUANT_HELP)
    g.add_argument("--rule", "-r", action="append", dest="rules", metavar="REGEX=FORMAT", help=RULE_HELP)
    g.add_argument("--config", "-c", metavar="FILE", help="TOML file (or preset name from configs/) "
                   "with keys model, quant, rules, device, max_model_len, seed, threads, max_num_seqs, "
                   "max_num_batched_tokens, block_size, kv_cache_memory, batch_invariant, decode_activations; "
                   "flags override it")
    g.add_argument("--device", help="cpu or cuda[:N] (default: cpu)")
    g.add_argument("--max-model-len", type=int, help="context length to reserve KV cache for "
                   "(default: the model's, at most 8192)")
    g.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    g.add_argument("--decode-activations", choices=("int8", "fp32"),
                   help="int4 on CPU: the fused decode step rounds each linear layer's input to "
                   "int8 per block of 32 and multiplies in integers (default int8, about 2x the "
                   "GEMM speed), or keeps it fp32")
    g.add_argument("--seed", type=int, help="global random seed (default 0)")
    _retune_arg(g)


RETUNE_HELP = ("time the kernel candidates again instead of reading this machine's stored "
               "choices, and store the new ones (the same as NIBBLE_RETUNE=1; the choices live "
               "in $NIBBLE_CACHE/tuning/, ~/.cache/nibble/tuning/ by default)")


def _retune_arg(g) -> None:
    g.add_argument("--retune", action="store_true", help=RETUNE_HELP)


def _sampling_args(p: argparse.ArgumentParser, temperature: float, top_p: float = 1.0) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="new tokens at most (default 256)")
    g.add_argument("--temperature", "-t", type=float, default=temperature,
                   help=f"0 is greedy (default {temperature})")
    g.add_argument("--top-p", type=float, default=top_p,
                   help=f"nucleus sampling mass (default {top_p}{': off' if top_p == 1.0 else ''})")
    g.add_argument("--top-k", type=int, default=-1, help="sample from the k most likely (default -1: off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="default 1.0: off")
    g.add_argument("--sample-seed", type=int, help="per-request seed that makes sampling reproducible")
    g.add_argument("--stop", action="append", help="stop string, not included in the output; repeatable")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nibble", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="complete prompts and print the text",
                         description="Complete one or more prompts (greedy by default). Text is "
                         "streamed as it is generated when one prompt is given.")
    gen.add_argument("prompts", nargs="*", help="prompt texts; '-' or none reads one from stdin")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template as a user message")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt "
                     "(text, token ids, finish reason, timings)")
    _model_args(gen)
    _sampling_args(gen, temperature=0.0)

    chat = sub.add_parser("chat", help="talk to the model in the terminal",
                          description="Interactive chat with the model's chat template; tokens are "
                          "printed as they come. Commands: /reset clears the history, /exit quits "
                          "(or Ctrl-D).")
    chat.add_argument("--system", help="system prompt")
    _model_args(chat)
    # Small models ramble at the usual 0.7; 0.2 / 0.9 is what SmolLM2's authors sample with.
    _sampling_args(chat, temperature=0.2, top_p=0.9)

    quant = sub.add_parser("quantize", help="quantize a model and save it (nibble, GPTQ or AWQ "
                           "layout)", description="Quantize module by module while loading, then "
                           "save safetensors + nibble_quant.json + tokenizer to --out. Loading it "
                           "later gives the same packed weights without quantizing again. With "
                           "--method gptq or awq: calibrate on --calib text and save a Hugging "
                           "Face directory in that method's standard layout instead. With "
                           "--method smoothquant: calibrate on --calib text, move the "
                           "activations' outliers into the weights (folded into the norms) and "
                           "save a w8a8 nibble checkpoint.")
    quant.add_argument("--out", "-o", required=True, type=Path, help="output directory")
    m = quant.add_argument_group("method (default rtn: round to nearest with --quant/--rule, "
                                 "saved as a nibble checkpoint)")
    m.add_argument("--method", choices=["rtn", "gptq", "awq", "smoothquant"], default="rtn",
                   help="gptq or awq: calibrate on --calib text and quantize every linear layer "
                   "but lm_head with GPTQ (error feedback through the inputs' Hessian) or AWQ "
                   "(activation-aware per-feature scales folded into the norms), saved in that "
                   "method's standard layout (config.json quantization_config; GPTQ: qweight/"
                   "qzeros/scales/g_idx, AWQ: GEMM packing) that nibble and other tools load. "
                   "smoothquant: per-feature scales s = max|x|^alpha / max|w|^(1-alpha) from "
                   "--calib text, folded into the norms (q|k|v, gate|up) and up's rows (down; "
                   "o_proj is not smoothed), then every linear layer but lm_head stored as w8a8 "
                   "(int8 weights per output channel, int8 activations) in a nibble checkpoint")
    _calib_args(m, tokens=16384, ctx=512, scored="")
    m.add_argument("--bits", type=int, help="bits per weight: gptq 4 or 8 (8 loads "
                   "as group-wise int8), awq 4 (default 4)")
    m.add_argument("--act-order", action="store_true", help="gptq: quantize the input features "
                   "in order of decreasing Hessian diagonal (desc_act), so the loudest ones are "
                   "rounded first and the rest absorb their error; nibble serves it by "
                   "gathering each layer's input in the stored order")
    m.add_argument("--group-size", type=int, help="gptq, awq: weights per scale and zero point "
                   "along the input features: 32, 64 or 128 (default 128)")
    m.add_argument("--alpha", type=float, help="smoothquant: the migration strength in [0, 1], "
                   "the share of the activations' range moved into the weights (default 0.5; "
                   "0.75-0.85 for models with large activation outliers)")
    m.add_argument("--act-scales", choices=["dynamic", "static"], help="smoothquant: "
                   "activation scales per token, from each row's absmax at run time (dynamic, "
                   "the default), or one per layer calibrated on --calib text after smoothing "
                   "and stored as input_scale (static)")
    _model_args(quant)

    insp = sub.add_parser("inspect", help="show which module gets which format, and weight bytes",
                          description="Load the model with the given policy and print each linear "
                          "module's format and the weight bytes per format.")
    insp.add_argument("--json", action="store_true", help="machine-readable output")
    insp.add_argument("--all", action="store_true", help="list every module, not one line per distinct pattern")
    _model_args(insp)
    _serve_parser(sub)
    _compare_parser(sub)
    _plan_parser(sub)
    _bench_parser(sub)
    return parser


SERVE_DESCRIPTION = """\
Serve the OpenAI API (POST /v1/completions, /v1/chat/completions, /tokenize, /detokenize;
GET /v1/models, /tokenizer_info, /health, /metrics; POST /v1/compare for a small A/B job) on HOST:PORT. The server listens at once; /health answers
503 while the model loads, 200 when ready. With --variants it loads several variants of one
model into one process and serves them as MODEL:VARIANT (the bare name is the first), for
A/B comparisons. SIGTERM or Ctrl-C drains: /health turns 503, new requests are refused with
503, in-flight ones get up to --shutdown-timeout seconds to finish, then the process exits 0.

  nibble serve --model smollm2-135m --quant int4
  nibble serve --variants bf16,int4 --port 8080 --api-key secret
  nibble serve --quant int8 --shadow bf16 --shadow-rate 0.05 --quality-gate 'kld<0.01'

With --ray (pip install 'nibble[cluster]') the engines run in Ray Serve replicas, on this
machine or across a Ray cluster, behind this process's HTTP layer; every flag above applies to
each replica. Requests whose prompts share a prefix go to the replica that has it cached.

  nibble serve --ray --replicas 2 --threads 1
  nibble serve --ray --ray-address auto --autoscale 1:4     # after `ray start` on each machine"""


def _serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="serve the OpenAI API over HTTP",
                           description=SERVE_DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    g = serve.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; "
                   "0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=8000, help="default 8000 (0: any free port)")
    g.add_argument("--variants", metavar="Q1,Q2,...", help="serve several quantizations of the "
                   "model side by side, e.g. bf16,int4 (each one is loaded); or `variants = "
                   "[...]` in --config. Default: the one --quant names")
    g.add_argument("--api-key", default=os.environ.get("NIBBLE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint except /health "
                   "and /metrics, which stay open for probes and scrapers (default: "
                   "$NIBBLE_API_KEY; none: no key needed)")
    g.add_argument("--max-queued", type=int, default=64, help="requests that may wait per "
                   "variant beyond its running batch (--max-num-seqs); more get 429 with "
                   "Retry-After at once (default 64)")
    g.add_argument("--queue-timeout", type=float, default=0.0, metavar="SECONDS", help="a request "
                   "whose first token has not come SECONDS after it arrived is dropped and gets "
                   "429, before any byte of the response is sent: under overload the excess is "
                   "refused instead of waiting past a TTFT target (default 0: no limit)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight "
                   "requests get to finish after SIGTERM before they are aborted (default 30)")
    g.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body; larger "
                   "ones get 413 (default 8)")
    q = serve.add_argument_group("quality (A/B)")
    q.add_argument("--shadow", metavar="VARIANT", help="a reference variant (e.g. "
                   "smollm2-135m:bf16, or bf16) that re-scores, teacher-forced and at idle "
                   "priority, the tokens served for a sample of finished requests; per-token KL "
                   "divergence and top-1 agreement go to /metrics as nibble_shadow_*. Also the "
                   "default reference of POST /v1/compare")
    q.add_argument("--shadow-rate", type=float, default=0.1, help="fraction of finished "
                   "completions the shadow scores (default 0.1)")
    q.add_argument("--quality-gate", metavar="EXPR", help="before serving, compare each "
                   "quantized variant with the model's 16-bit weights on the built-in corpus "
                   "and exit with status 3 unless EXPR holds, e.g. 'kld<0.05' "
                   "or 'kld<0.05,top1>0.9'; metrics: kld, kld_p99, top1, ppl_ratio, rms_dp")
    q.add_argument("--quality-gate-tokens", type=int, default=1024, help="tokens the gate "
                   "scores (default 1024: 8 chunks of 256, the second half of each); at least 16")
    e = serve.add_argument_group("batching")
    e.add_argument("--max-num-seqs", type=int, help="sequences in one batch at most (default 16)")
    e.add_argument("--max-num-batched-tokens", type=int,
                   help="tokens in one forward pass at most; longer prompts are chunked (default 512)")
    e.add_argument("--kv-cache-memory", type=float, help="KV-cache size: bytes, or a fraction "
                   "(0-1] of memory, a container's memory limit where it is lower (default: enough "
                   "for max-num-seqs full-length sequences, at most 10%% of memory)")
    r = serve.add_argument_group("scaling out on Ray Serve (or a [ray] table in --config)")
    r.add_argument("--ray", action="store_true", help="serve from Ray Serve replicas, each one "
                   "engine set with the model, variants and limits above; this process keeps "
                   "the HTTP API and routes each request to a replica")
    r.add_argument("--replicas", type=int, help="replicas to run (default 1)")
    r.add_argument("--autoscale", metavar="MIN:MAX", help="let Ray Serve scale between MIN and "
                   "MAX replicas on the ongoing requests per replica; a replica scaled down "
                   "finishes its in-flight requests first")
    r.add_argument("--target-ongoing", type=float, metavar="N", help="--autoscale: ongoing "
                   "requests per replica Ray Serve aims for (default: --max-num-seqs)")
    r.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster ('auto': the one "
                   "`ray start` began on this machine; or HOST:PORT of its head); default: start "
                   "a local cluster for this server's life")
    r.add_argument("--router", choices=("prefix", "pow2"), help="prefix (default): a prompt goes "
                   "to the replica that already holds its prefix unless that one is much busier, "
                   "else to the less busy of two; pow2: Ray Serve's own two-choice routing")
    _model_args(serve)


COMPARE_DESCRIPTION = """\
Measure what variant B costs against variant A (the reference) on the same tokens:
  teacher-forced  chunks of --ctx tokens of a corpus, the second half of each scored: perplexity
                  of A and B and their ratio, KL(A||B) over the full vocabulary (mean, median,
                  p90, p99, max), top-1 agreement, RMS change of the true token's probability;
                  95% bootstrap intervals over chunks, paired
  free-running    greedy outputs of both on a prompt set: identical outputs, token agreement,
                  where the first divergent token falls (median, survival curve)
  cost            decode tok/s (alternating A and B) and weight bytes of each side
Writes report.json and report.png (KLD and delta-p distributions, running mean KLD, divergence
curve) to --out and prints a table. A and B are each a quantization (int4-g64, nf4), a model
(a path, an alias, a checkpoint from `nibble quantize`), MODEL:QUANT, or a config file or
preset with rules (mixed-attn-int8-mlp-int4). The corpus and prompts are built in unless given.

  nibble compare --a bf16 --b int4
  nibble compare --a bf16 --b ./smollm2-int4            # a saved checkpoint against its original
  nibble compare --a int4 --b mixed-attn-int8-mlp-int4 --corpus my.txt --ctx 256"""


def _compare_parser(sub) -> None:
    cmp = sub.add_parser("compare", help="A/B: what a quantization costs against the original",
                         description=COMPARE_DESCRIPTION,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    g = cmp.add_argument_group("variants")
    g.add_argument("--model", "-m", default="smollm2-135m", help="the model a bare quantization "
                   "applies to (default: smollm2-135m)")
    g.add_argument("--a", default="bf16", metavar="VARIANT", help="the reference (default bf16)")
    g.add_argument("--b", default="int4", metavar="VARIANT", help="the variant measured against "
                   "it (default int4)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    g.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    _retune_arg(g)
    t = cmp.add_argument_group("measurements")
    t.add_argument("--corpus", default="builtin", metavar="FILE|builtin", help="UTF-8 text for the "
                   "teacher-forced part (default: CPython's pydoc_data.topics)")
    t.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    t.add_argument("--chunks", type=int, default=16, help="chunks scored, at least 2 (default 16)")
    t.add_argument("--prompts", default="builtin", metavar="FILE|builtin", help="prompts for the "
                   "free-running part: one per line, or .jsonl with {\"prompt\"} or {\"messages\"} "
                   "(default: 12 built-in chat prompts)")
    t.add_argument("--max-tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    t.add_argument("--no-free-running", action="store_true", help="skip the greedy generation part")
    t.add_argument("--no-cost", action="store_true", help="skip the decode-speed timing")
    cmp.add_argument("--out", "-o", type=Path, help="directory for report.json and report.png "
                     "(default: ./nibble-compare-B-vs-A)")
    cmp.add_argument("--json", action="store_true", help="print the JSON report instead of the table")


PLAN_DESCRIPTION = """\
Will it fit, and what does each layer cost in quality?

  estimate  (default) the memory each format needs, from the model's config and file headers
            only (no weight is read): weights as `nibble inspect` counts them, the layouts and
            copies the device's kernels keep, the KV cache for --concurrency sequences of
            --context tokens, the largest forward pass's workspace and the runtime; and which
            formats fit --memory. `nibble serve` and LLM(...) refuse, before loading, what
            does not fit the device.
  --scan    quantize one module group at a time (q|k|v, o, gate|up, down of each layer, and
            lm_head) to each of --formats with the rest 16-bit, and measure the mean KL
            divergence from the 16-bit model on calibration text, teacher-forced: which
            layers are sensitive. Writes scan.json and scan.png to --out.
  --weight-budget SIZE
            from a scan (run now, or --from-scan FILE), the per-module formats that minimize
            the summed KL divergence within SIZE bytes of weights (as `nibble inspect` counts
            them), written as a config file (--out, default plan.toml) that `nibble serve -c`
            and `nibble compare --b` load.

  nibble plan --memory 8GiB --context 8192 --concurrency 16
  nibble plan --scan --formats int4,int4-g32,int8,nf4 --out scan/
  nibble plan --from-scan scan/scan.json --weight-budget 120MB --out plan.toml"""


def _plan_parser(sub) -> None:
    plan = sub.add_parser("plan", help="will it fit; which layers are sensitive; the best mix "
                          "of formats under a memory budget", description=PLAN_DESCRIPTION,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    g = plan.add_argument_group("model")
    g.add_argument("--model", "-m", help="alias, HF directory, .gguf file or nibble checkpoint "
                   "(default: smollm2-135m)")
    g.add_argument("--quant", "-q", help="estimate this quantization only (default: one row per "
                   "--formats entry)")
    g.add_argument("--rule", "-r", action="append", dest="rules", metavar="REGEX=FORMAT",
                   help=RULE_HELP)
    g.add_argument("--config", "-c", metavar="FILE", help="TOML config file or preset (as for "
                   "nibble serve); flags override it")
    g.add_argument("--device", help="cpu or cuda[:N] (default: cpu)")
    g.add_argument("--threads", type=int, help="CPU threads for --scan (default: all cores)")
    g.add_argument("--formats", metavar="Q1,Q2,...", help="formats of the estimate table and of "
                   "the scan (default: bf16,int8,int4,int4-g32,nf4 for the table, "
                   "int4,int4-g32,int8,nf4 for the scan)")
    m = plan.add_argument_group("estimate")
    m.add_argument("--memory", metavar="SIZE", help="the budget, e.g. 8GiB or 16GB (default: "
                   "the device's memory, or a container's lower limit)")
    m.add_argument("--context", type=int, dest="max_model_len", metavar="TOKENS",
                   help="tokens per sequence "
                   "(default: the model's context length, at most 8192)")
    m.add_argument("--concurrency", type=int, help="sequences whose full context the KV cache "
                   "holds at once (default: what `nibble serve` reserves: --max-num-seqs 16 "
                   "sequences, at most 10%% of memory)")
    m.add_argument("--kv-dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="element type of the KV cache (default auto: what nibble uses on the "
                   "device, fp32 on CPU and the activation dtype on CUDA)")
    m.add_argument("--max-num-seqs", type=int, help="the engine's batch size at most (default 16)")
    m.add_argument("--max-num-batched-tokens", type=int, help="rows of the largest forward pass "
                   "(default 512)")
    m.add_argument("--kv-cache-memory", type=float, help="as for nibble serve: the KV cache in "
                   "bytes or a fraction of memory (default: see --concurrency)")
    s = plan.add_argument_group("sensitivity scan and plan")
    s.add_argument("--scan", action="store_true", help="measure each module group's KL "
                   "divergence at each format (minutes on CPU for a small model)")
    _calib_args(s, tokens=1024, ctx=256, scored=", the second half of each scored")
    s.add_argument("--from-scan", type=Path, metavar="FILE", help="a scan.json from an earlier "
                   "--scan, instead of scanning again")
    s.add_argument("--weight-budget", metavar="SIZE", help="bytes of weights the plan may use, "
                   "e.g. 120MB or 4GiB")
    plan.add_argument("--out", "-o", type=Path, help="--scan: a directory for scan.json and "
                      "scan.png (default ./nibble-scan); --weight-budget: the plan's config file "
                      "(default plan.toml)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of tables")
    _retune_arg(plan)
    plan.set_defaults(seed=None, decode_activations=None)


BENCH_DESCRIPTION = """\
Load-test OpenAI-compatible servers with locust (headless) and report throughput, time to first
token (TTFT), inter-token latency (ITL), goodput under an SLO, errors and server memory. The
targets are nibble servers this command starts, one after another (--quant bf16,int4: one per
variant), or running servers at --url (nibble, vLLM, llama.cpp's server, TGI: measured the same
way). Several targets go side by side in one report.

Profiles:
  steady    --users N closed-loop users (default 4), or --rate R Poisson arrivals per second,
            for --duration seconds (default 60)
  ramp      Poisson stages of --duration seconds (default 30) from --ramp-start req/s, times
            --ramp-factor each stage, until good/sent falls below the SLO's goodput_ratio;
            --refine bisections follow. Capacity: the highest rate that held
  overload  2x the capacity (--capacity, or a ramp first) for --duration seconds (default 60):
            the excess should get 429, the accepted requests should meet the SLO, no 5xx
  soak      a steady run of --duration seconds (default 600): the server's memory growth and
            the KV-cache blocks not returned once it is idle

A request is good when it succeeds with TTFT and mean ITL within the SLO; the SLO passes when
p99 TTFT and p99 ITL are within it and no request failed except by 429. The SLO file (TOML:
ttft_p99_ms, itl_p99_ms, goodput_ratio, max_rss_growth_mb) defaults to the preset slo-cpu.
Client numbers are checked against the server's /metrics (generated tokens, mean TTFT); a
disagreement is printed. Writes report.json, report.png and one JSON line per request to --out.
Exit status: 0 when every target passes, 1 when one fails, 2 for a usage error.

  nibble bench serve --quant bf16,int4 --profile ramp
  nibble bench serve --url http://127.0.0.1:8000 --profile steady --rate 1 --duration 120
  nibble bench serve --quant int4 --profile overload --capacity 1.2 \\
      --server-args '--max-num-seqs 8 --max-queued 2'"""


def _bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks of a running service (bench serve)",
                           description="Benchmarks. `nibble bench serve --help` for the load test.")
    kinds = bench.add_subparsers(dest="bench_command", required=True, metavar="KIND")
    p = kinds.add_parser("serve", help="load-test OpenAI-compatible servers (locust profiles, "
                         "SLO, goodput)", description=BENCH_DESCRIPTION,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    t = p.add_argument_group("targets (--url, or nibble servers started here)")
    t.add_argument("--url", action="append", default=[], help="base URL of a running "
                   "OpenAI-compatible server; repeatable")
    t.add_argument("--served-model", action="append", default=[], metavar="NAME", help="model "
                   "name to send, one per --url or one for all (default: the first of /v1/models)")
    t.add_argument("--label", action="append", default=[], help="name of each target in the "
                   "report, in order (default: the variant, or host:port)")
    t.add_argument("--model", "-m", default="smollm2-135m", help="model of the started servers "
                   "(default smollm2-135m)")
    t.add_argument("--quant", "-q", help="variants to start one server each for, comma-separated "
                   "(default int4 when no --url)")
    t.add_argument("--config", "-c", metavar="FILE", help="config file or preset for the "
                   "started servers")
    t.add_argument("--server-args", default="", metavar="ARGS", help="more `nibble serve` flags "
                   "for the started servers, e.g. '--max-num-seqs 8 --max-queued 2'")
    g = p.add_argument_group("load")
    g.add_argument("--profile", choices=["steady", "ramp", "overload", "soak"], default="steady",
                   help="default steady")
    g.add_argument("--users", type=int, default=0, help="closed-loop users (steady, soak)")
    g.add_argument("--rate", type=float, default=0.0, help="Poisson arrivals per second (steady, soak)")
    g.add_argument("--duration", type=float, help="seconds of sending per run or ramp stage")
    g.add_argument("--drain", type=float, default=120.0, help="seconds the requests in flight "
                   "get to finish after sending stops (default 120)")
    g.add_argument("--ramp-start", type=float, default=0.25, help="first ramp rate, req/s (default 0.25)")
    g.add_argument("--ramp-factor", type=float, default=1.5, help="rate multiplier per stage (default 1.5)")
    g.add_argument("--ramp-stages", type=int, default=8, help="stages at most (default 8)")
    g.add_argument("--refine", type=int, default=1, help="bisection stages after the ramp (default 1)")
    g.add_argument("--capacity", type=float, help="overload: the capacity in req/s (skips the ramp)")
    g.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    w = p.add_argument_group("requests")
    w.add_argument("--api", choices=["chat", "completions", "mixed"], default="chat", help="default chat")
    w.add_argument("--prompts", choices=["short", "medium", "long", "mixed"], default="short",
                   help="built-in prompt set (default short)")
    w.add_argument("--max-tokens", type=int, default=64, help="output tokens per request, with "
                   "ignore_eos (default 64)")
    w.add_argument("--api-key", default=os.environ.get("NIBBLE_API_KEY", ""),
                   help="Bearer key to send (default: $NIBBLE_API_KEY)")
    p.add_argument("--slo", default="slo-cpu", metavar="FILE", help="SLO TOML file or preset "
                   "(default slo-cpu)")
    p.add_argument("--out", "-o", type=Path, help="report directory (default ./nibble-bench-PROFILE)")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of the table")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """Config file first, flags on top; unknown keys and bad values fail here."""
    if args.command == "compare":  # each side builds its own (server/commands.py)
        return EngineConfig(model=args.model, device=args.device, threads=args.threads)
    if args.command == "bench":  # the servers it starts read their own flags
        return EngineConfig()
    data = read_config(args.config) if args.config else {}
    flags = {"model": args.model, "quant": args.quant, "device": args.device,
             "max_model_len": args.max_model_len, "threads": args.threads, "seed": args.seed,
             "decode_activations": getattr(args, "decode_activations", None)}
    for key in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_memory"):
        flags[key] = getattr(args, key, None)
    data.update({k: v for k, v in flags.items() if v is not None})
    if args.command != "serve" and "variants" in data:
        raise ConfigError(f"config key 'variants' is read by `nibble serve` only, not by "
                          f"`nibble {args.command}`; give --quant instead")
    if args.command != "serve" and "ray" in data:
        raise ConfigError(f"config table [ray] is read by `nibble serve` only, not by "
                          f"`nibble {args.command}`")
    if args.command == "serve":
        args.ray_table = data.pop("ray", None)
        file_variants = data.pop("variants", None)
        if args.variants is None and file_variants is not None:
            if not isinstance(file_variants, list) or not all(isinstance(q, str) for q in file_variants):
                raise ConfigError("config key 'variants' must be a list of quantization strings")
            args.variants = ",".join(file_variants)
    if args.rules:  # flags first: the first matching rule wins
        data["rules"] = [*args.rules, *rules_from_config(data.get("rules", []))]
    return EngineConfig.from_dict(data)


def _show_engine_log() -> None:
    """INFO lines of the "nibble" loggers (which kernel path serves which batch sizes) go to
    stderr; other libraries' logging is left as it is."""
    logger = logging.getLogger("nibble")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("nibble: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def apply_environment(args: argparse.Namespace) -> None:
    """Flags that act through the environment, read where kernels are prepared."""
    if getattr(args, "retune", False):
        os.environ["NIBBLE_RETUNE"] = "1"  # kernels/tuning_cache.py


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_environment(args)
    _show_engine_log()
    from server import commands

    try:
        return commands.run(args, engine_config(args))
    except NibbleError as exc:
        print(f"nibble: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
