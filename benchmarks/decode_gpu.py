"""Decode speed on one CUDA GPU: a Llama-3-8B-shaped decoder in fp16 against nibble's int8,
int4 and nf4 linear layers, each decode step captured in a CUDA graph and replayed.

Weights are random (speed does not depend on their values) and built layer by layer on the GPU,
so no checkpoint is needed. Embeddings and lm_head stay 16-bit, as nibble serves them. The KV
cache holds --context positions before timing starts; tok/s = batch x steps / wall time of
--steps decode steps. One variant is built, measured and freed at a time (fp16 alone is 16 GB).
Writes JSON with machine, versions and date under benchmarks/results/.

    python benchmarks/decode_gpu.py                          # batches 1,16, all variants
    python benchmarks/decode_gpu.py --variants fp16,int4 --batches 1
    python benchmarks/decode_gpu.py --smoke                  # CPU: tiny shapes, no graphs
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16", help="batch sizes (default 1,16)")
    ap.add_argument("--variants", help="linear-layer formats (default: --dtype,int8,int4,nf4)")
    ap.add_argument("--steps", type=int, help="timed decode steps per run (default 128)")
    ap.add_argument("--context", type=int, help="positions already in the KV cache (default 128)")
    ap.add_argument("--rounds", type=int, help="runs per variant and batch, median reported (3)")
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="activations")
    ap.add_argument("--no-graphs", action="store_true", help="time eager steps, no CUDA graphs")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny shapes, Triton interpreter")
    ap.add_argument("--out", type=Path, help="JSON path (default: under benchmarks/results/)")
    args = ap.parse_args(argv)
    smoke = args.smoke
    args.steps = (2 if smoke else 128) if args.steps is None else args.steps
    args.context = (8 if smoke else 128) if args.context is None else args.context
    args.rounds = (1 if smoke else 3) if args.rounds is None else args.rounds
    args.variants = args.variants or f"{args.dtype},int8,int4,nf4"
    args.graphs = not (args.no_graphs or smoke)
    return args


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.smoke:
        # Triton picks interpreted or compiled kernels when kernels/triton defines them, so
        # this must happen before the imports below pull that module in.
        os.environ["NIBBLE_KERNELS"] = "triton"
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import machine_info  # noqa: E402
from engine.config import FLOAT_FORMATS, ModelConfig, QuantSpec  # noqa: E402
from engine.errors import ConfigError  # noqa: E402
from engine.layers.embedding import Embedding  # noqa: E402
from engine.layers.linear import QuantLinear  # noqa: E402
from engine.layers.norm import RMSNorm  # noqa: E402
from engine.layers.rotary import RotaryEmbedding, apply_rotary  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA3_8B = ModelConfig(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                        rms_norm_eps=1e-5, rope_theta=500000.0)
SMOKE = ModelConfig(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                    num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                    rope_theta=500000.0)
# Replayed vs eager logits, relative L2: run-to-run noise (split-K atomics) is far below it;
# even fp16 against fp32 arithmetic through 32 random layers stays under 4e-3 (measured, CPU).
GRAPH_TOLERANCE = 1e-2


class Layer(nn.Module):
    """A Llama decoder layer over a static-shape KV cache [B, Hkv, max_len, D], so that a whole
    step can be captured in a CUDA graph (engine/layers/attention.py keeps Python lists)."""

    def __init__(self, cfg: ModelConfig, spec: QuantSpec, dt: torch.dtype):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size, self.inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.attn_norm, self.mlp_norm = RMSNorm(hidden, eps, dt), RMSNorm(hidden, eps, dt)
        self.qkv_proj = QuantLinear(hidden, (cfg.q_size, cfg.kv_size, cfg.kv_size), spec, dt)
        self.o_proj = QuantLinear(cfg.q_size, (hidden,), spec, dt)
        self.gate_up_proj = QuantLinear(hidden, (self.inter, self.inter), spec, dt)
        self.down_proj = QuantLinear(self.inter, (hidden,), spec, dt)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, cache: tuple[Tensor, Tensor],
                pos: Tensor, mask: Tensor) -> Tensor:
        h = h + self.o_proj(self.attention(self.attn_norm(h), cos, sin, cache, pos, mask))
        gate_up = self.gate_up_proj(self.mlp_norm(h))
        return h + self.down_proj(F.silu(gate_up[:, :self.inter]) * gate_up[:, self.inter:])

    def attention(self, x: Tensor, cos: Tensor, sin: Tensor, cache: tuple[Tensor, Tensor],
                  pos: Tensor, mask: Tensor) -> Tensor:
        b, h, hkv, d = x.shape[0], self.heads, self.kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        qk = apply_rotary(qkv[:, :self.q_size + self.kv_size].view(b, h + hkv, d), cos, sin)
        v = qkv[:, self.q_size + self.kv_size:].view(b, hkv, d)
        # index_copy_ at a device tensor: the write position needs no host sync.
        cache[0].index_copy_(2, pos, qk[:, h:].unsqueeze(2))
        cache[1].index_copy_(2, pos, v.unsqueeze(2))
        # One query per sequence: each KV head's query heads go on the query-length axis, which
        # is grouped-query attention without repeating KV heads or needing enable_gqa.
        q = qk[:, :h].reshape(b, hkv, h // hkv, d)
        return F.scaled_dot_product_attention(q, *cache, attn_mask=mask).reshape(b, h * d)


class Decoder(nn.Module):
    """forward(tokens [B], pos [1], caches) -> logits [B, vocab]; all sequences of the batch
    sit at the same position, which costs the same as any other positions."""

    def __init__(self, cfg: ModelConfig, spec: QuantSpec, dt: torch.dtype, max_len: int):
        super().__init__()
        self.act_dtype = dt
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size, dt)
        self.layers = nn.ModuleList(Layer(cfg, spec, dt) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt)
        head_spec = QuantSpec(next(k for k, v in FLOAT_FORMATS.items() if v == dt))  # 16-bit
        self.lm_head = QuantLinear(cfg.hidden_size, (cfg.vocab_size,), head_spec, dt)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_len, cfg.rope_theta, None)
        self.register_buffer("slots", torch.arange(max_len), persistent=False)

    def forward(self, tokens: Tensor, pos: Tensor, caches: list[tuple[Tensor, Tensor]]) -> Tensor:
        h = self.embed(tokens)
        cos, sin = self.rotary.lookup(pos, h.dtype)
        mask = (self.slots <= pos).view(1, 1, 1, -1)  # slots past pos hold stale values
        for layer, cache in zip(self.layers, caches, strict=True):
            h = layer(h, cos, sin, cache, pos, mask)
        return self.lm_head(self.norm(h))

    def linears(self) -> list[QuantLinear]:
        return [m for m in self.modules() if isinstance(m, QuantLinear)]

    def weight_bytes(self) -> int:
        """Stored bytes of every linear layer (lm_head included) plus the embedding table."""
        emb = self.embed.weight
        return sum(m.method.stored_bytes for m in self.linears()) + emb.numel() * emb.element_size()

    def kernel_path(self, batch: int) -> str:
        method = self.layers[0].gate_up_proj.method
        return method.kernel_path(batch) if hasattr(method, "kernel_path") else "F.linear"


def build_model(cfg: ModelConfig, spec: QuantSpec, dt: torch.dtype, device: torch.device,
                max_len: int) -> Decoder:
    def random(rows: int, cols: int) -> Tensor:
        return torch.randn(rows, cols, dtype=dt, device=device) * 0.02

    model = Decoder(cfg, spec, dt, max_len)
    model.embed.weight = nn.Parameter(random(cfg.vocab_size, cfg.hidden_size), requires_grad=False)
    model.to(device)
    model.rotary.cos, model.rotary.sin = model.rotary.cos.to(device), model.rotary.sin.to(device)
    for lin in model.linears():
        # Made on the device shard by shard and prepared at once: quantization runs on the
        # device and at most one fused 16-bit weight is alive at a time.
        for i, rows in enumerate(lin.shard_sizes):
            lin.load_shard("weight", i, random(rows, lin.in_features))
        lin.prepare(device)
    return model


class Runner:
    """One batch size's decode state: static token and position buffers, a random KV cache
    standing in for the prompt's, and (on CUDA) the captured graph of one step."""

    def __init__(self, model: Decoder, cfg: ModelConfig, batch: int, context: int, max_len: int):
        device = model.slots.device
        self.model, self.batch, self.context, self.device = model, batch, context, device
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.caches = [(torch.randn(shape, dtype=model.act_dtype, device=device),
                        torch.randn(shape, dtype=model.act_dtype, device=device))
                       for _ in range(cfg.num_layers)]
        self.start_tokens = torch.randint(cfg.vocab_size, (batch,), device=device)
        self.tokens = self.start_tokens.clone()
        self.pos = torch.full((1,), context, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: Tensor | None = None

    def step(self) -> Tensor:
        logits = self.model(self.tokens, self.pos, self.caches)
        # Greedy token and position advance stay on the device: no host sync inside a step.
        self.tokens.copy_(logits.argmax(dim=-1))
        self.pos.add_(1)
        return logits

    def reset(self) -> None:
        self.pos.fill_(self.context)
        self.tokens.copy_(self.start_tokens)

    def run(self, steps: int) -> float:
        """Decodes `steps` tokens per sequence from the start state; returns tok/s."""
        self.reset()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
        if cuda:
            torch.cuda.synchronize()
        return self.batch * steps / (time.perf_counter() - start)

    def warm_up(self, graphs: bool, steps: int) -> None:
        self.reset()
        if not torch.isfinite(self.step()).all():
            raise RuntimeError(f"batch {self.batch}: eager logits are not finite")
        if graphs:
            self.capture()
            self.check_graph()
        self.run(min(steps, 8))  # first calls compile kernels, pick algorithms, upload the graph

    def capture(self) -> None:
        # Eager steps on a side stream before capture, as the CUDA graph docs prescribe.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.reset()
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.reset()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.graph_logits = self.step()

    def check_graph(self) -> None:
        """One replay must match one eager step from the same state: a broken capture fails
        here instead of reporting a fast wrong number."""
        self.reset()
        want = self.step().float()
        self.reset()
        self.graph.replay()
        err = ((self.graph_logits.float() - want).norm() / want.norm()).item()
        pos = int(self.pos.item())
        if not err < GRAPH_TOLERANCE or pos != self.context + 1:
            raise RuntimeError(f"batch {self.batch}: the replayed step differs from the eager "
                               f"one (relative error {err:.3g}, position {pos}, expected "
                               f"{self.context + 1})")


def measure_variant(cfg: ModelConfig, variant: str, batches: list[int], args,
                    device: torch.device) -> dict:
    max_len = -(-(args.context + args.steps) // 64) * 64  # whole 64-slot blocks: aligned mask
    print(f"{variant}: building {cfg.num_layers} layers on {device} ...", file=sys.stderr)
    model = build_model(cfg, QuantSpec.parse(variant), FLOAT_FORMATS[args.dtype], device, max_len)
    runners = [Runner(model, cfg, b, args.context, max_len) for b in batches]
    for runner in runners:
        runner.warm_up(args.graphs, args.steps)
    runs: dict[int, list[float]] = {b: [] for b in batches}
    for i in range(args.rounds):
        for runner in runners:  # alternating batch sizes: drift hits them alike
            runs[runner.batch].append(runner.run(args.steps))
            print(f"round {i + 1}/{args.rounds} {variant:>6} batch {runner.batch:>3}: "
                  f"{runs[runner.batch][-1]:9.1f} tok/s", file=sys.stderr)
    out = {"runs": runs, "bytes": model.weight_bytes(),
           "paths": {b: model.kernel_path(b) for b in batches}}
    del runners, runner, model  # the CUDA graphs and their memory pools go with the runners
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def check_args(args) -> tuple[list[str], list[int]]:
    variants = [v.strip() for v in args.variants.split(",")]
    for v in variants:
        spec = QuantSpec.parse(v)
        if spec.is_float and spec.method != args.dtype:
            raise ConfigError(f"variant {v!r}: the unquantized variant stores weights in the "
                              f"activation dtype; use {args.dtype!r} or --dtype {spec.method}")
    batches = [int(b) for b in args.batches.split(",") if b.strip().isdigit()]
    if len(batches) != len(args.batches.split(",")) or min(batches) < 1:
        raise ConfigError(f"--batches {args.batches!r}: give positive integers, e.g. 1,16")
    if args.steps < 1 or args.rounds < 1 or args.context < 0:
        raise ConfigError("--steps and --rounds must be at least 1, --context at least 0")
    return variants, batches


def _show_kernel_log() -> None:
    # A first run on a GPU tunes every layer shape for minutes: say so rather than look hung.
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger("nibble.kernels").addHandler(handler)
    logging.getLogger("nibble.kernels").setLevel(logging.INFO)


def main(args: argparse.Namespace) -> None:
    try:
        variants, batches = check_args(args)
    except ConfigError as exc:
        sys.exit(f"decode_gpu.py: {exc}")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("decode_gpu.py needs a CUDA GPU (or use --smoke for a tiny CPU run)")
    device = torch.device("cpu" if args.smoke else "cuda")
    machine = machine_info()  # first: a missing package fails now, not after the measuring
    _show_kernel_log()
    torch.manual_seed(0)
    cfg = SMOKE if args.smoke else LLAMA3_8B
    with torch.inference_mode():
        measured = {v: measure_variant(cfg, v, batches, args, device) for v in variants}
    report = make_report(args, cfg, machine, measured)
    slug = re.sub(r"[^a-z0-9]+", "-", machine.get("gpu", "cpu").lower()).strip("-")
    out = args.out or RESULTS / f"decode-gpu-{slug}-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(_table(report))
    print(f"\nwrote {out}", file=sys.stderr)


def make_report(args, cfg: ModelConfig, machine: dict, measured: dict) -> dict:
    base = next((v for v in measured if QuantSpec.parse(v).is_float), None)
    rows = []
    for v, m in measured.items():
        for b, runs in m["runs"].items():
            med = statistics.median(runs)
            ref = statistics.median(measured[base]["runs"][b]) if base else None
            rows.append({"variant": v, "batch": b, "tok_per_s": round(med, 2),
                         "runs": [round(x, 2) for x in runs],
                         "vs_fp16": round(med / ref, 2) if ref else None,
                         "weight_gib": round(m["bytes"] / 2**30, 2), "weight_bytes": m["bytes"],
                         "kernel_path": m["paths"][b]})
    how = "CUDA graph replays" if args.graphs else "eager steps"
    return {"benchmark": "decode-gpu", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": "smoke shape" if args.smoke else "Llama-3-8B shape, random weights",
            "shape": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size",
                      "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")},
            "context": args.context, "steps": args.steps, "rounds": args.rounds,
            "dtype": args.dtype, "graphs": args.graphs, "smoke": args.smoke,
            "definition": f"tok/s = batch x steps / wall time of {args.steps} greedy decode "
            f"steps ({how}, device synchronized before and after), KV cache holding "
            f"{args.context} positions; one variant built, measured in rounds alternating batch "
            "sizes, and freed at a time; median of rounds; vs_fp16 = ratio to the unquantized "
            "16-bit variant at the same batch; weight_bytes = stored linear weights (16-bit "
            "lm_head) + 16-bit embeddings; kernel_path = layer 0 gate_up_proj's path",
            "machine": machine, "results": rows}


def _table(report: dict) -> str:
    lines = ["| variant | batch | tok/s | vs fp16 | weights (GiB) | gate_up path |",
             "|---|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        ratio = "-" if r["vs_fp16"] is None else f"{r['vs_fp16']:.2f}x"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['tok_per_s']:.1f} | {ratio} | "
                     f"{r['weight_gib']:.2f} | {r['kernel_path']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(ARGS)
