"""An A/B comparison of two loaded variants: what B costs in quality against A, and what it
saves.

    report = compare(LLM(quant="bf16"), LLM(quant="int4"), "bf16", "int4").report  # engine.eval

Three parts, each optional: teacher-forced metrics on a corpus (stats.summarize), greedy
free-running agreement on a prompt set (stats.compare_outputs), and cost (decode tok/s and
weight bytes of each side, measured in the same run, alternating A and B).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from engine.eval import stats
from engine.eval.plot import PlotData
from engine.eval.texts import BUILTIN, corpus_chunks, corpus_text, load_prompts
from engine.machine import machine_info
from engine.progress import counter
from engine.report import kernel_report, total_bytes
from engine.sampling_params import SamplingParams

SCHEMA = "nibble.compare/1"


@dataclass(frozen=True)
class CompareOptions:
    corpus: str = BUILTIN  # "builtin" or a text file
    ctx: int = 512  # tokens per chunk; the second half of each is scored
    chunks: int = 16
    prompts: str | list[str] = BUILTIN  # "builtin", a file, or texts (chat-templated)
    max_prompts: int | None = None
    max_tokens: int = 64  # greedy tokens per prompt in the free-running part
    free_running: bool = True
    cost: bool = True
    speed_tokens: int = 64  # decode length of each timing round
    speed_rounds: int = 3  # per side, alternating A and B; the median is reported


@dataclass
class Comparison:
    report: dict
    plot: PlotData


def compare(a, b, label_a: str, label_b: str, opts: CompareOptions | None = None,
            progress: bool = True) -> Comparison:
    """Compares two LLMs (A is the reference) on the same tokens; both must share a tokenizer
    and have idle engines."""
    opts = opts or CompareOptions()
    if a.loaded.config.vocab_size != b.loaded.config.vocab_size:
        raise ValueError(f"{label_a} and {label_b} have different vocabularies "
                         f"({a.loaded.config.vocab_size} vs {b.loaded.config.vocab_size}); "
                         "they cannot be compared token by token")
    start = time.perf_counter()
    text, corpus_name = corpus_text(opts.corpus)
    chunks = corpus_chunks(a.tokenizer, text, opts.ctx, opts.chunks)
    prompts = load_prompts(a.tokenizer, opts.prompts, opts.max_prompts) if opts.free_running else []
    total = len(chunks) + 2 * bool(prompts) + 2 * opts.speed_rounds * opts.cost
    with counter(total, desc=f"{label_b} vs {label_a}", unit="step", enabled=progress) as bar:
        per_chunk = []
        for chunk in chunks:
            per_chunk.append(stats.score_chunk(a.score, b.score, chunk))
            bar.update(1)
        teacher = teacher_forced_section(corpus_name, opts.ctx, per_chunk)
        free = None
        if prompts:
            params = SamplingParams(max_tokens=opts.max_tokens, temperature=0.0)
            outs = []
            for llm in (a, b):
                outs.append([o.token_ids for o in llm.generate([p.ids for p in prompts], params)])
                bar.update(1)
            free = free_running_section(outs, opts.max_tokens, _name(opts.prompts))
        side_a = side(a.loaded, label_a, total_bytes(a.model))
        side_b = side(b.loaded, label_b, total_bytes(b.model))
        cost = weights_section(side_a, side_b)
        if opts.cost:
            cost = {**_speed(a, b, prompts[0].ids if prompts else chunks[0][:64], opts, bar), **cost}
    report = {"schema": SCHEMA, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "a": side_a, "b": side_b,
              "teacher_forced": teacher, "free_running": free, "cost": cost if opts.cost else None,
              "seconds": round(time.perf_counter() - start, 1), "machine": machine_info(),
              "options": {k: v for k, v in asdict(opts).items() if k != "prompts"}}
    plot = PlotData(label_a, label_b, torch.cat([c.kld for c in per_chunk]).tolist(),
                    torch.cat([c.dp for c in per_chunk]).tolist(),
                    [c.kld.mean().item() for c in per_chunk],
                    [tuple(p) for p in free["survival"]] if free else [], opts.max_tokens)
    return Comparison(report, plot)


def _name(prompts: str | list[str]) -> str:
    return "request" if isinstance(prompts, list) else prompts


# The report's sections, shared with the server's POST /v1/compare.

def side(loaded, label: str, weight_bytes: int) -> dict:
    """One side of a report; `loaded` is the LLM's engine.build.Loaded. `kernels` says which
    kernels computed its numbers (engine.report.kernel_report), and `cpu_dispatch` what the
    process's load-time CPU dispatch chose and whether it read the choice from the machine's
    stored ones (kernels.cpu.choices): two processes that agree there compute alike."""
    from kernels import cpu

    return {"label": label, "model": loaded.source.name, "policy": loaded.policy.describe(),
            "weight_bytes": weight_bytes, "kernels": kernel_report(loaded.model),
            "cpu_dispatch": cpu.choices()}


def teacher_forced_section(corpus: str, ctx: int, per_chunk: list[stats.TokenStats]) -> dict:
    return {"corpus": corpus, "ctx": ctx, "chunks": len(per_chunk), **stats.summarize(per_chunk)}


def free_running_section(outs: list[list[list[int]]], max_tokens: int, prompt_set: str) -> dict:
    """outs: [A's outputs, B's outputs], one token list per prompt."""
    return {"max_tokens": max_tokens, "prompt_set": prompt_set, **stats.compare_outputs(*outs)}


def weights_section(side_a: dict, side_b: dict) -> dict:
    wa, wb = side_a["weight_bytes"], side_b["weight_bytes"]
    return {"a_weight_bytes": wa, "b_weight_bytes": wb, "weight_ratio_b_over_a": round(wb / wa, 4)}


def _speed(a, b, prompt: list[int], opts: CompareOptions, bar) -> dict:
    """Single-stream decode speed of each side, alternating A and B so that machine load hits
    both alike; tok/s = new tokens / wall time of the call (prefill included)."""
    params = SamplingParams(max_tokens=opts.speed_tokens, temperature=0.0, ignore_eos=True)
    times: dict[str, list[float]] = {"a": [], "b": []}
    for _ in range(opts.speed_rounds):
        for key, llm in (("a", a), ("b", b)):
            t0 = time.perf_counter()
            llm.generate([prompt], params)
            times[key].append(opts.speed_tokens / (time.perf_counter() - t0))
            bar.update(1)
    tok_a, tok_b = statistics.median(times["a"]), statistics.median(times["b"])
    return {"decode_tokens": opts.speed_tokens, "rounds": opts.speed_rounds,
            "prompt_tokens": len(prompt),
            "a_decode_tok_s": round(tok_a, 2), "b_decode_tok_s": round(tok_b, 2),
            "speedup_b_over_a": round(tok_b / tok_a, 3)}


def format_table(report: dict) -> str:
    """The terminal summary of a report."""
    a, b = report["a"]["label"], report["b"]["label"]
    t = report["teacher_forced"]
    kld = t["kld"]

    def ci(v: dict, fmt: str, scale: float = 1.0) -> str:
        lo, hi = v["ci95"]
        return f"{scale * v['value']:{fmt}} [{scale * lo:{fmt}}, {scale * hi:{fmt}}]"

    lines = [f"{b} (B) against {a} (A)",
             f"teacher-forced: {t['chunks']} chunks x {t['ctx']} tokens of {t['corpus']}, "
             f"{t['scored_tokens']} tokens scored; [95% bootstrap interval]",
             f"  perplexity      A {t['ppl_a']:.3f}   B {t['ppl_b']:.3f}   B/A {ci(t['ppl_ratio'], '.4f')}",
             f"  KLD(A||B)       mean {kld['mean']:.5f} [{kld['ci95'][0]:.5f}, {kld['ci95'][1]:.5f}]  "
             f"median {kld['median']:.5f}  p90 {kld['p90']:.4f}  p99 {kld['p99']:.4f}  max {kld['max']:.3f}",
             f"  top-1 agreement {ci(t['top1_agreement'], '.2f', 100)} %",
             f"  RMS delta-p     {ci(t['rms_dp'], '.3f', 100)} %"]
    if f := report.get("free_running"):
        med = f["median_first_divergence"]
        lines += [f"free-running (greedy, {f['prompts']} prompts x {f['max_tokens']} tokens):",
                  f"  identical outputs {100 * f['exact_match_rate']:.1f} %   token agreement "
                  f"{100 * f['token_agreement']:.1f} %   median first divergence "
                  + (f"at token {med}" if med is not None else "not reached (most outputs agree)")]
    lines += [f"kernels: A {report['a']['kernels']['decode_step']}; B "
              f"{report['b']['kernels']['decode_step']} (per layer and batch size in the JSON)"]
    if dispatch := report["b"]["cpu_dispatch"]:
        stored = sum(c["source"] == "cached" for c in dispatch)
        lines += [f"  CPU dispatch: {len(dispatch)} choices, {stored} read from this machine's "
                  f"stored ones, {len(dispatch) - stored} measured now (NIBBLE_RETUNE=1 measures "
                  "all again)"]
    if c := report.get("cost"):
        lines += [f"cost (decode {c['decode_tokens']} tokens, median of {c['rounds']}, alternating):",
                  f"  decode tok/s     A {c['a_decode_tok_s']:.1f}   B {c['b_decode_tok_s']:.1f}   "
                  f"B/A {c['speedup_b_over_a']:.2f}x",
                  f"  weights MiB      A {c['a_weight_bytes'] / 2**20:.1f}   B {c['b_weight_bytes'] / 2**20:.1f}"
                  f"   B/A {c['weight_ratio_b_over_a']:.2f}x"]
    return "\n".join(lines)
