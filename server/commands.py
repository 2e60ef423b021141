"""The work behind each `nibble` subcommand."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

from engine.config import FLOAT_FORMATS as FLOAT_DTYPES
from engine.config import EngineConfig
from engine.errors import ConfigError, NibbleError
from engine.sampling_params import SamplingParams


def run(args: argparse.Namespace, cfg: EngineConfig) -> int:
    return {"serve": serve, "generate": generate, "chat": chat, "quantize": quantize,
            "inspect": inspect, "compare": compare, "plan": plan,
            "bench": bench}[args.command](args, cfg)


def serve(args: argparse.Namespace, cfg: EngineConfig) -> int:
    import asyncio
    import dataclasses

    from engine import hub
    from server.app import ServerSettings
    from server.app import serve as run_server

    labels = [q.strip() for q in args.variants.split(",")] if args.variants else [cfg.quant]
    if args.variants and (not all(labels) or len(set(labels)) != len(labels)):
        raise ConfigError(f"--variants {args.variants!r}: give distinct quantizations, "
                          "comma-separated, e.g. bf16,int4")
    # a bad quantization string fails here, before anything loads
    configs = [(q, dataclasses.replace(cfg, quant=q)) for q in labels]
    from engine.eval import parse_gate

    gate = tuple(parse_gate(args.quality_gate)) if args.quality_gate else ()
    shadow = None
    if args.shadow:
        shadow = variant_config(args.shadow, cfg)
    for name, value, ok in (("--port", args.port, 0 <= args.port < 65536),
                            ("--shadow-rate", args.shadow_rate, 0 <= args.shadow_rate <= 1),
                            ("--quality-gate-tokens", args.quality_gate_tokens,
                             args.quality_gate_tokens >= 16),
                            ("--max-queued", args.max_queued, args.max_queued >= 0),
                            ("--queue-timeout", args.queue_timeout, args.queue_timeout >= 0),
                            ("--shutdown-timeout", args.shutdown_timeout, args.shutdown_timeout >= 0),
                            ("--max-body-mb", args.max_body_mb, args.max_body_mb > 0)):
        if not ok:
            raise ConfigError(f"{name} {value} is out of range")
    settings = ServerSettings(
        host=args.host, port=args.port, api_key=args.api_key or None, max_queued=args.max_queued,
        queue_timeout=args.queue_timeout or None, shutdown_timeout=args.shutdown_timeout,
        max_body_bytes=int(args.max_body_mb * 2**20), shadow_rate=args.shadow_rate,
        quality_gate=gate, quality_gate_tokens=args.quality_gate_tokens)
    model_name = hub.resolve_model(cfg.model).name
    if args.ray or args.ray_table is not None or any(getattr(args, k) is not None for k in (
            "replicas", "autoscale", "ray_address", "router", "target_ongoing")):
        return _serve_ray(args, cfg, settings, model_name, configs, shadow)
    return asyncio.run(run_server(settings, model_name, configs, shadow))


def _serve_ray(args, cfg: EngineConfig, settings, model_name: str, configs: list,
               shadow) -> int:
    """`nibble serve --ray`: each replica loads what this process would have loaded, with
    --threads per replica (default: this machine's cores shared by the replicas)."""
    import asyncio
    import dataclasses
    import importlib.util
    import os

    from server.cluster.ingress import cluster_settings
    from server.cluster.ingress import serve as serve_ray
    from server.cluster.replica import ReplicaSpec

    flags = {"address": args.ray_address, "replicas": args.replicas, "autoscale": args.autoscale,
             "target_ongoing": args.target_ongoing, "router": args.router}
    cluster = cluster_settings(args.ray_table, flags, cfg.device, cfg.threads, os.cpu_count() or 1)
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise ConfigError("--ray needs Ray Serve: pip install 'nibble[cluster]' (or "
                          "'ray[serve]')")
    threads = cfg.threads if cluster.gpus else (cfg.threads or int(cluster.cpus))
    configs = tuple((q, dataclasses.replace(c, threads=threads)) for q, c in configs)
    if shadow is not None:
        shadow = (shadow[0], dataclasses.replace(shadow[1], threads=threads))
    # the replicas never see HTTP, so the API key stays in this process
    spec = ReplicaSpec(model_name, configs, shadow, dataclasses.replace(settings, api_key=None))
    return asyncio.run(serve_ray(settings, cluster, spec))


def _params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        seed=args.sample_seed, stop=args.stop, ignore_eos=args.ignore_eos)


def _llm(cfg: EngineConfig):
    from engine.llm import LLM

    return LLM(config=cfg)


def generate(args: argparse.Namespace, cfg: EngineConfig) -> int:
    prompts = [p for p in args.prompts if p != "-"]
    if not prompts:
        if sys.stdin.isatty():
            raise ConfigError("give a prompt: nibble generate \"Once upon a time\" (or pipe one "
                              "into stdin); for a conversation use nibble chat")
        prompts = [sys.stdin.read()]
    if not any(p.strip() for p in prompts):
        raise ConfigError("the prompt is empty; pass text as an argument or on stdin")
    params = _params(args)
    llm = _llm(cfg)
    for prompt in prompts:
        ids = llm.encode_chat([{"role": "user", "content": prompt}]) if args.chat else prompt
        start, first, out = time.perf_counter(), None, None
        for out in llm.stream(ids, params):
            first = first or time.perf_counter()
            if not args.json:
                print(out.delta, end="", flush=True)
        end = time.perf_counter()
        if args.json:
            print(json.dumps(_result_json(prompt, out, start, first, end)))
        else:
            print()
    return 0


def _result_json(prompt: str, out, start: float, first: float, end: float) -> dict:
    n = len(out.token_ids)
    decode = end - first
    return {"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
            "finish_reason": out.finish_reason, "prompt_tokens": len(out.prompt_token_ids),
            "completion_tokens": n, "time_to_first_token_s": round(first - start, 4),
            "decode_tokens_per_s": round((n - 1) / decode, 2) if n > 1 and decode > 0 else None}


def chat(args: argparse.Namespace, cfg: EngineConfig) -> int:
    params = _params(args)
    llm = _llm(cfg)
    interactive = sys.stdin.isatty()
    history = [{"role": "system", "content": args.system}] if args.system else []
    if interactive:
        print(f"nibble chat: {llm.loaded.source.name} ({llm.loaded.policy.describe()}). "
              "/reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        for out in llm.stream(llm.encode_chat(history), params):
            print(out.delta, end="", flush=True)
            reply = out.text
        print()
        history.append({"role": "assistant", "content": reply})
    return 0


def quantize(args: argparse.Namespace, cfg: EngineConfig) -> int:
    from engine import build
    from engine.checkpoint import save_checkpoint
    from engine.report import bytes_per_format, module_weights

    if args.out.exists() and any(args.out.iterdir()):
        raise ConfigError(f"{args.out} exists and is not empty; choose a new --out directory")
    _method_flags(args)
    if args.method == "smoothquant":
        return _quantize_smoothquant(args, cfg)
    if args.method != "rtn":
        return _quantize_calibrated(args, cfg)
    loaded = build.load(cfg, prepare=False)
    save_checkpoint(loaded.model, loaded.tokenizer, args.out, _source_name(loaded, cfg))
    sizes = bytes_per_format(module_weights(loaded.model))
    print(f"saved {loaded.source.name} ({loaded.policy.describe()}) to {args.out}")
    for fmt, n in sorted(sizes.items()):
        print(f"  {fmt:>10}: {n / 2**20:9.2f} MiB")
    return 0


def _source_name(loaded, cfg: EngineConfig) -> str:
    """Where the 16-bit original lives, for compare and the quality gate: the alias, a path,
    a hub id."""
    from pathlib import Path

    local = Path(cfg.model).expanduser()
    return loaded.source.alias or (str(local.resolve()) if local.exists() else cfg.model)


def _method_flags(args: argparse.Namespace) -> None:
    """A method's flags given with another method are refused; the rest get their defaults."""
    from engine.quant import smoothquant

    others = [flag for flag, given in (("--bits", args.bits is not None),
                                       ("--group-size", args.group_size is not None),
                                       ("--act-order", args.act_order)) if given]
    smoothquant.check_flags(args.method, args.alpha, args.act_scales, others)
    args.bits = 4 if args.bits is None else args.bits
    args.group_size = 128 if args.group_size is None else args.group_size


def _calibration_llm(args: argparse.Namespace, cfg: EngineConfig):
    """-> (a float32 copy of the model, --calib's chunks, the text's name): exact inputs for
    the statistics, and fast on CPU."""
    import dataclasses

    from engine.eval.texts import calibration_text, corpus_chunks
    from engine.llm import LLM

    if args.calib_tokens < args.calib_ctx or args.calib_ctx < 16:
        raise ConfigError(f"--calib-tokens {args.calib_tokens} must hold at least one chunk of "
                          f"--calib-ctx {args.calib_ctx} (at least 16) tokens")
    text, name = calibration_text(args.calib)
    llm = LLM(config=dataclasses.replace(cfg, quant="fp32", max_model_len=args.calib_ctx,
                                         max_num_batched_tokens=args.calib_ctx))
    chunks = corpus_chunks(llm.tokenizer, text, args.calib_ctx,
                           max(2, args.calib_tokens // args.calib_ctx))
    return llm, chunks, name


def _quantize_calibrated(args: argparse.Namespace, cfg: EngineConfig) -> int:
    """--method gptq or awq: calibrate a float32 copy of the model, write the standard layout."""
    from engine import calibrate

    calibrate.check_options(args.method, args.bits, args.group_size, args.act_order)
    if cfg.quant or cfg.rules:
        raise ConfigError(f"--method {args.method} quantizes every linear layer but lm_head to "
                          "--bits and --group-size; drop --quant and --rule")
    llm, chunks, name = _calibration_llm(args, cfg)
    start = time.perf_counter()
    if args.method == "gptq":
        results = calibrate.quantize_model(llm.model, calibrate.collect_hessians(llm, chunks),
                                           args.bits, args.group_size, act_order=args.act_order)
    else:
        results = calibrate.awq_model(llm.model, calibrate.collect_inputs(llm, chunks),
                                      args.group_size)
    calibrate.save_packed(llm.model, llm.tokenizer, results, args.out, args.method,
                          args.group_size, extra={"quantizer": "nibble", "calibration": name,
                                                  "calibration_tokens": len(chunks) * args.calib_ctx},
                          bits=args.bits)
    order = ", act-order" if args.act_order else ""
    print(f"saved {llm.loaded.source.name} as {args.method.upper()} int{args.bits}, group "
          f"{args.group_size}{order}, calibrated on {len(chunks) * args.calib_ctx} tokens of {name}, to "
          f"{args.out} ({time.perf_counter() - start:.0f} s)")
    return 0


def _quantize_smoothquant(args: argparse.Namespace, cfg: EngineConfig) -> int:
    """--method smoothquant: smooth a float32 copy of the model, save it as a w8a8 nibble
    checkpoint."""
    from engine.quant import smoothquant

    if (cfg.quant and cfg.quant.strip().lower() != smoothquant.FORMAT) or cfg.rules:
        raise ConfigError(f"--method smoothquant stores every linear layer but lm_head as "
                          f"{smoothquant.FORMAT}; drop --quant and --rule")
    alpha = smoothquant.ALPHA if args.alpha is None else args.alpha
    act_scales = args.act_scales or "dynamic"
    llm, chunks, name = _calibration_llm(args, cfg)
    start = time.perf_counter()
    model = smoothquant.smoothquant(llm, chunks, alpha, act_scales)
    tokens = len(chunks) * args.calib_ctx
    smoothquant.save(model, llm.tokenizer, args.out, _source_name(llm.loaded, cfg),
                     {"alpha": alpha, "act_scales": act_scales, "calibration": name,
                      "calibration_tokens": tokens})
    print(f"saved {llm.loaded.source.name} as {smoothquant.FORMAT} (SmoothQuant, alpha {alpha}, "
          f"{act_scales} activation scales), calibrated on {tokens} tokens of {name}, to "
          f"{args.out} ({time.perf_counter() - start:.0f} s)")
    return 0


def inspect(args: argparse.Namespace, cfg: EngineConfig) -> int:
    from engine import build
    from engine.report import bytes_per_format, collapse_layers, module_weights

    loaded = build.load(cfg, prepare=False)
    rows = module_weights(loaded.model)
    sizes = bytes_per_format(rows)
    if args.json:
        print(json.dumps({"model": loaded.source.name, "policy": loaded.policy.describe(),
                          "modules": [r.__dict__ for r in rows], "bytes_per_format": sizes}, indent=2))
        return 0
    print(f"{loaded.source.name}  policy: {loaded.policy.describe()}")
    print(f"{'module':<44} {'format':>10} {'count':>6} {'MiB':>10}")
    table = [(r.name, r.format, 1, r.nbytes) for r in rows] if args.all else collapse_layers(rows)
    shared = {r.name: r.shared_with for r in rows if r.shared_with}
    for name, fmt, count, nbytes in table:
        note = f"  (shares {shared[name]})" if name in shared else ""
        print(f"{name:<44} {fmt:>10} {count:>6} {nbytes / 2**20:10.3f}{note}")
    print("\nweight bytes per format:")
    total = sum(sizes.values())
    for fmt, n in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"  {fmt:>10}: {n / 2**20:9.2f} MiB  ({100 * n / total:4.1f}%)")
    print(f"  {'total':>10}: {total / 2**20:9.2f} MiB")
    return 0


def plan(args: argparse.Namespace, cfg: EngineConfig) -> int:
    """`nibble plan`: the memory table, or a sensitivity scan and a plan under a budget."""
    from engine import plan as memory

    for name, value in (("--concurrency", args.concurrency), ("--calib-tokens", args.calib_tokens),
                        ("--calib-ctx", args.calib_ctx)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value}")
    budget = memory.parse_bytes(args.memory) if args.memory else None
    if args.scan or args.from_scan or args.weight_budget:
        return _plan_scan(args, cfg)
    formats = tuple(q.strip() for q in args.formats.split(",")) if args.formats else memory.FORMATS
    if args.quant:
        formats = (args.quant,)
    kv = None if args.kv_dtype == "auto" else FLOAT_DTYPES[args.kv_dtype]
    ests = memory.fitting(cfg, formats, concurrency=args.concurrency, memory=budget, kv_dtype=kv)
    if args.json:
        print(json.dumps({"estimates": [e.to_json() for e in ests]}, indent=2))
    else:
        print(memory.format_table(ests))
    return 0


SCAN_FORMATS = "int4,int4-g32,int8,nf4"


def _plan_scan(args: argparse.Namespace, cfg: EngineConfig) -> int:
    """`nibble plan --scan` and/or `--weight-budget`: measure, then plan under the budget."""
    import dataclasses
    from collections import Counter
    from pathlib import Path

    from engine import sensitivity
    from engine.plan import fmt_bytes, parse_bytes

    budget = parse_bytes(args.weight_budget) if args.weight_budget else None
    if args.scan and args.from_scan:
        raise ConfigError("give --scan (measure now) or --from-scan FILE (an earlier scan), "
                          "not both")
    if not args.scan and not args.from_scan:
        raise ConfigError("--weight-budget plans from a scan: add --scan, or --from-scan FILE")
    if args.from_scan:
        try:
            scan = sensitivity.Scan.from_json(args.from_scan.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read the scan {args.from_scan}: {exc.strerror}") from None
    else:
        if cfg.quant or cfg.rules:
            raise ConfigError("--scan quantizes one module group at a time from the 16-bit "
                              "model; drop --quant and --rule (list the candidates in --formats)")
        if args.calib != "builtin" and not Path(args.calib).is_file():
            raise ConfigError(f"cannot read the calibration text {args.calib!r}: no such file "
                              "(or give 'builtin')")
        if args.calib_ctx < 16 or args.calib_tokens < 2 * args.calib_ctx:
            raise ConfigError(f"--calib-tokens {args.calib_tokens} must hold at least two "
                              f"chunks of --calib-ctx {args.calib_ctx} (at least 16) tokens")
        # the scan goes to --out, or beside the plan that --out names
        scan_dir = Path("nibble-scan") if args.out is None else \
            args.out.with_name(args.out.stem + "-scan") if budget else args.out
        if scan_dir.exists() and not scan_dir.is_dir():
            raise ConfigError(f"{scan_dir} exists and is not a directory")
        scan = _run_scan(args, dataclasses.replace(cfg, quant="fp32", rules=()), scan_dir)
        print(f"wrote {scan_dir / 'scan.json'} and {scan_dir / 'scan.png'}", file=sys.stderr)
    if budget is None:
        return 0
    out = args.out or Path("plan.toml")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give the plan's file name, e.g. plan.toml")
    result = sensitivity.plan(scan, budget)
    sensitivity.write_plan(out, scan.model, result, [
        f"scan: {len(scan.modules)} modules x {', '.join(scan.formats)}, {scan.scored_tokens} "
        f"tokens of {scan.calibration or 'calibration text'}"])
    counts = ", ".join(f"{n} {f}" for f, n in Counter(result.assignment.values()).most_common())
    print(f"plan: weights {fmt_bytes(result.nbytes)} of {fmt_bytes(budget)} ({counts}); predicted "
          f"KLD {result.kld:.4f} (each module's KLD measured alone, summed)")
    print(f"wrote {out}; measure it: nibble compare --a bf16 --b {out}")
    return 0


def _run_scan(args: argparse.Namespace, cfg: EngineConfig, out):
    import dataclasses

    from engine import sensitivity
    from engine.eval.texts import calibration_text, corpus_chunks
    from engine.llm import LLM
    from engine.sensitivity.plot import write_scan_png

    formats = [f.strip() for f in (args.formats or SCAN_FORMATS).split(",") if f.strip()]
    text, name = calibration_text(args.calib)
    # the reference: the 16-bit weights in fp32 (exact, and CPUs without bf16 units emulate
    # bf16 matmuls); KV for the chunks only
    llm = LLM(config=dataclasses.replace(cfg, max_model_len=args.calib_ctx,
                                         max_num_batched_tokens=max(args.calib_ctx, 512)))
    chunks = corpus_chunks(llm.tokenizer, text, args.calib_ctx, args.calib_tokens // args.calib_ctx)
    scan = sensitivity.scan(llm, chunks, formats, calibration=name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scan.json").write_text(scan.to_json(), encoding="utf-8")
    write_scan_png(out / "scan.png", scan)
    print(scan.to_json() if args.json else sensitivity.format_table(scan))
    return scan


def variant_config(text: str, base: EngineConfig) -> tuple[str, EngineConfig]:
    """A compare/serve variant -> (label, config): a quantization (int4-g64), a config file or
    preset with rules, MODEL:QUANT, or a model (alias, path, nibble checkpoint)."""
    import dataclasses
    from pathlib import Path

    from engine import hub
    from engine.config import QuantPolicy
    from engine.config_files import is_config_name, read_config

    text = text.strip()
    if not text:
        raise ConfigError("a variant is empty; give a quantization, a model or a config")
    try:
        QuantPolicy.build(text)
        return text, dataclasses.replace(base, quant=text, rules=())
    except ConfigError as exc:
        not_quant = str(exc)
    if is_config_name(text) and not Path(text).is_dir():
        data = {"model": base.model, "device": base.device, "threads": base.threads,
                **read_config(text)}
        return Path(text).name.removesuffix(".toml"), EngineConfig.from_dict(data)
    model, _, quant = text.rpartition(":")
    if model and not Path(text).exists():
        QuantPolicy.build(quant)  # MODEL:QUANT with a typo in QUANT fails here, naming it
        hub.resolve_model(model, progress=False)
        return text, dataclasses.replace(base, model=model, quant=quant, rules=())
    try:
        source = hub.resolve_model(text)
    except NibbleError as exc:
        raise ConfigError(f"variant {text!r} is neither a quantization ({not_quant}) nor a "
                          f"model ({exc}) nor a config file") from None
    return source.name, dataclasses.replace(base, model=text, quant=None, rules=())


def compare(args: argparse.Namespace, cfg: EngineConfig) -> int:
    from pathlib import Path

    from engine.eval import CompareOptions, format_table
    from engine.eval import compare as run_compare
    from engine.eval.plot import write_png
    from engine.llm import LLM
    from engine.loader import reader_cache

    for name, value, low in (("--ctx", args.ctx, 16), ("--chunks", args.chunks, 2),
                             ("--max-tokens", args.max_tokens, 1)):
        if value < low:
            raise ConfigError(f"{name} must be at least {low}, got {value}")
    for name, value in (("corpus", args.corpus), ("prompts", args.prompts)):
        if value != "builtin" and not Path(value).is_file():
            raise ConfigError(f"cannot read the {name} {value!r}: no such file (or give 'builtin')")
    (label_a, cfg_a), (label_b, cfg_b) = variant_config(args.a, cfg), variant_config(args.b, cfg)
    if label_a == label_b:
        label_a, label_b = f"A:{label_a}", f"B:{label_b}"
    opts = CompareOptions(corpus=args.corpus, ctx=args.ctx, chunks=args.chunks, prompts=args.prompts,
                          max_tokens=args.max_tokens, free_running=not args.no_free_running,
                          cost=not args.no_cost)
    out = args.out or Path(f"nibble-compare-{_safe(label_b)}-vs-{_safe(label_a)}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    with reader_cache():  # both sides usually read one model file: parse it once
        llm_a, llm_b = LLM(config=cfg_a), LLM(config=cfg_b)
    result = run_compare(llm_a, llm_b, label_a, label_b, opts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result.report, indent=2) + "\n")
    write_png(out / "report.png", result.plot)
    print(json.dumps(result.report, indent=2) if args.json else format_table(result.report))
    print(f"wrote {out / 'report.json'} and {out / 'report.png'}", file=sys.stderr)
    return 0


def _safe(label: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def bench(args: argparse.Namespace, cfg: EngineConfig) -> int:
    """`nibble bench serve`: every usage mistake is exit 2 before any server starts."""
    import shlex
    from pathlib import Path
    from urllib.parse import urlparse

    from loadtests import bench as lt
    from loadtests.report import SLO, table

    try:
        slo = SLO.load(args.slo)
        opts = lt.Options(profile=args.profile, users=args.users, rate=args.rate,
                          duration=args.duration, drain=args.drain, ramp_start=args.ramp_start,
                          ramp_factor=args.ramp_factor, ramp_stages=args.ramp_stages,
                          refine=args.refine, capacity=args.capacity, seed=args.seed,
                          workload=lt.Workload(args.api, args.prompts, args.max_tokens,
                                               args.api_key or ""), slo=slo)
        opts.check()
        lt.check_locust()
        server_args = shlex.split(args.server_args)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(str(exc)) from None
    for url in args.url:
        if urlparse(url).scheme not in ("http", "https") or not urlparse(url).netloc:
            raise ConfigError(f"--url {url!r}: give a base URL such as http://127.0.0.1:8000")
    if len(args.served_model) > 1 and len(args.served_model) != len(args.url):
        raise ConfigError("give one --served-model for all --url targets, or one per --url")
    quants = [q.strip() for q in args.quant.split(",")] if args.quant else ([] if args.url else ["int4"])
    if not all(quants):
        raise ConfigError(f"--quant {args.quant!r}: comma-separated variants, e.g. bf16,int4")
    names = [urlparse(u).netloc for u in args.url] + quants
    if len(args.label) > len(names):
        raise ConfigError(f"{len(args.label)} --label for {len(names)} targets")
    labels = _distinct(args.label + names[len(args.label):])
    targets: list = []
    for i, url in enumerate(args.url):
        model = (args.served_model[i] if len(args.served_model) > 1
                 else args.served_model[0] if args.served_model else "")
        targets.append(lt.Target(labels[i], url.rstrip("/"), model))
    for label, q in zip(labels[len(args.url):], quants, strict=True):
        flags = ["--model", args.model, "--quant", q]
        flags += ["--config", args.config] if args.config else []
        flags += ["--api-key", args.api_key] if args.api_key else []
        targets.append((label, flags + server_args))
    out = args.out or Path(f"nibble-bench-{args.profile}")
    say = functools.partial(print, file=sys.stderr, flush=True)
    try:
        doc = lt.run(targets, opts, out, say)
    except RuntimeError as exc:
        print(f"nibble: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(table(doc["targets"]))
        print(f"report: {out / 'report.json'}, {out / 'report.png'}")
    return 0 if doc["pass"] else 1


def _distinct(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return out
