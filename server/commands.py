"""The work behind each `nibble` subcommand."""

from __future__ import annotations

import argparse
import json
import sys
import time

from engine.config import EngineConfig
from engine.errors import ConfigError
from engine.sampling_params import SamplingParams


def run(args: argparse.Namespace, cfg: EngineConfig) -> int:
    return {"serve": serve, "generate": generate, "chat": chat, "quantize": quantize, "inspect": inspect}[
        args.command](args, cfg)


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
    for name, value, ok in (("--port", args.port, 0 <= args.port < 65536),
                            ("--max-queued", args.max_queued, args.max_queued >= 0),
                            ("--shutdown-timeout", args.shutdown_timeout, args.shutdown_timeout >= 0),
                            ("--max-body-mb", args.max_body_mb, args.max_body_mb > 0)):
        if not ok:
            raise ConfigError(f"{name} {value} is out of range")
    settings = ServerSettings(args.host, args.port, args.api_key or None, args.max_queued,
                              args.shutdown_timeout, int(args.max_body_mb * 2**20))
    model_name = hub.resolve_model(cfg.model).name
    return asyncio.run(run_server(settings, model_name, configs))


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
    loaded = build.load(cfg, prepare=False)
    save_checkpoint(loaded.model, loaded.tokenizer, args.out, loaded.source.name)
    sizes = bytes_per_format(module_weights(loaded.model))
    print(f"saved {loaded.source.name} ({loaded.policy.describe()}) to {args.out}")
    for fmt, n in sorted(sizes.items()):
        print(f"  {fmt:>10}: {n / 2**20:9.2f} MiB")
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
