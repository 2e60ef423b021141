"""Quality checks in a running server: shadow A/B, the startup quality gate, /v1/compare.

Shadow A/B (`--shadow smollm2-135m:bf16 --shadow-rate 0.1`): for a sampled fraction of finished
completions, the reference variant scores the tokens the served variant produced, teacher-forced,
given the same prompt, and so does the served variant (its teacher-forced distribution is what
the KL divergence needs); both passes run as idle tasks on the engine thread, so they never take
a step from a live request. The backlog is bounded: when it is full, samples are dropped and
counted.

Quality gate (`--quality-gate "kld<0.05"`): before serving, every quantized variant is compared,
teacher-forced on the built-in corpus, against the model's 16-bit weights; a failed condition
stops the server with a message and exit status 3.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time

from engine.eval import CompareOptions, compare, is_16bit, reference_config, weights_key
from engine.eval import stats as eval_stats
from engine.eval.gate import Condition, failures
from engine.eval.runner import (
    SCHEMA,
    free_running_section,
    side,
    teacher_forced_section,
    weights_section,
)
from engine.eval.texts import BUILTIN_PROMPTS, corpus_chunks, corpus_text, load_prompts
from engine.sampling_params import SamplingParams
from server.async_engine import AsyncEngine, Stream, Variant
from server.protocol import APIError, CompareRequest, bad

log = logging.getLogger("nibble.server")

GATE_OPTIONS = CompareOptions(ctx=256, chunks=8, free_running=False, cost=False)
GATE_EXIT = 3
SHADOW_BACKLOG = 64  # sampled completions waiting to be scored at most
COMPARE_PROMPTS = 4  # built-in prompts a /v1/compare job generates from by default


class GateFailed(Exception):
    """A variant failed the quality gate; the message says which and by how much."""


class Shadow:
    """Scores sampled finished completions of every served variant with the reference."""

    def __init__(self, engine: AsyncEngine, reference: Variant, rate: float, metrics,
                 seed: int = 0, backlog: int = SHADOW_BACKLOG):
        self.engine, self.reference, self.rate, self.metrics = engine, reference, rate, metrics
        self.backlog = backlog
        self.pending = 0
        self._rng = random.Random(seed)
        engine.on_finished = self.finished
        metrics.watch_shadow([(v.name, reference.name) for v in engine.variants.values()
                              if v is not reference])

    def finished(self, stream: Stream, out) -> None:
        v = stream.variant
        if v is self.reference:
            return
        pair = (v.name, self.reference.name)
        for c in out.outputs:
            if c.finish_reason not in ("stop", "length") or not c.token_ids:
                continue
            if self._rng.random() >= self.rate:
                continue
            if len(stream.prompt_ids) + len(c.token_ids) > self.reference.engine.context_limit:
                self.metrics.shadow_request(pair, "skipped")
            elif self.pending >= self.backlog:
                self.metrics.shadow_request(pair, "dropped")
            else:
                self.pending += 1
                job = functools.partial(eval_stats.score_continuation, self.reference.llm.score,
                                        v.llm.score, stream.prompt_ids, list(c.token_ids))
                self.engine.run_idle(job).add_done_callback(functools.partial(self._done, pair))

    def _done(self, pair: tuple[str, str], fut: asyncio.Future) -> None:
        self.pending -= 1
        if fut.cancelled():
            return
        if (exc := fut.exception()) is not None:
            log.warning("shadow scoring of %s by %s failed: %r", *pair, exc)
            self.metrics.shadow_request(pair, "failed")
            return
        s = fut.result()
        self.metrics.shadow_scored(pair, s.kld.tolist(), int(s.top1.sum()))


# ---------------------------------------------------------------- startup quality gate

def run_gate(variants: list[Variant], conditions: list[Condition], loaded: list[Variant] = (),
             tokens: int = 1024) -> list[str]:
    """Compares each quantized variant with its 16-bit reference on `tokens` scored tokens of
    the built-in corpus (chunks of up to 256, the second half of each scored); returns one line
    per variant. Raises GateFailed naming every failed
    condition. References already loaded (a bf16 variant, the shadow) are reused; others are
    loaded for the check and released."""
    import dataclasses

    from engine.llm import LLM

    ctx = min(GATE_OPTIONS.ctx, tokens)
    opts = dataclasses.replace(GATE_OPTIONS, ctx=ctx, chunks=max(2, 2 * tokens // ctx))
    have = {weights_key(v.llm.config): v.llm for v in [*variants, *loaded]}
    lines, failed = [], []
    for v in variants:
        if is_16bit(v.llm.config):
            lines.append(f"quality gate: {v.name} is 16-bit, nothing to check")
            continue
        ref_cfg = reference_config(v.llm.config)
        ref = have.get(weights_key(ref_cfg))
        if ref is None:
            ref = have[weights_key(ref_cfg)] = LLM(config=ref_cfg, progress=False)
        report = compare(ref, v.llm, "16-bit", v.name, opts, progress=False).report
        t = report["teacher_forced"]
        line = (f"quality gate: {v.name} against {ref_cfg.model} bf16 ({t['scored_tokens']} tokens): "
                f"kld {t['kld']['mean']:.5f} [{t['kld']['ci95'][0]:.5f}, {t['kld']['ci95'][1]:.5f}], "
                f"top1 {t['top1_agreement']['value']:.4f}, ppl_ratio {t['ppl_ratio']['value']:.4f}")
        if bad_lines := failures(conditions, t):
            failed += [f"{v.name}: {b}" for b in bad_lines]
            line += " -> FAIL"
        else:
            line += " -> pass"
        lines.append(line)
    if failed:
        raise GateFailed("\n".join(lines + ["the quality gate "
                                            + " and ".join(str(c) for c in conditions)
                                            + " failed:"] + [f"  {f}" for f in failed]))
    return lines


# ---------------------------------------------------------------- POST /v1/compare

async def compare_job(state, req: CompareRequest) -> dict:
    """A small A/B job on the live server: teacher-forced chunks scored as idle tasks on the
    engine thread, then greedy generation through the normal request path. No decode timing
    (a live server's speed depends on its traffic): weight bytes only."""
    a, b = _pair(state, req)
    engine: AsyncEngine = state.engine
    off_loop = functools.partial(asyncio.get_running_loop().run_in_executor, state.pool)
    start = time.perf_counter()
    limit = min(a.engine.context_limit, b.engine.context_limit)
    if req.ctx > limit:
        raise bad("ctx", f"'ctx' {req.ctx} exceeds the context of {a.name} or {b.name} ({limit})")
    text, corpus = (req.text, "request") if req.text is not None else await off_loop(corpus_text, "builtin")
    try:
        chunks = await off_loop(corpus_chunks, a.tokenizer, text, req.ctx, req.chunks)
    except Exception as exc:  # too short a text
        raise bad("text", str(exc)) from None
    per_chunk = []
    for chunk in chunks:
        per_chunk.append(await engine.run_idle(functools.partial(
            eval_stats.score_chunk, a.llm.score, b.llm.score, chunk)))
    side_a, side_b = side(a.llm.loaded, a.name, a.weight_bytes), side(b.llm.loaded, b.name, b.weight_bytes)
    report = {"schema": SCHEMA, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "a": side_a, "b": side_b,
              "teacher_forced": await off_loop(teacher_forced_section, corpus, req.ctx, per_chunk),
              "free_running": None, "cost": weights_section(side_a, side_b)}
    if req.free_running:
        source = req.prompts or list(BUILTIN_PROMPTS[:COMPARE_PROMPTS])
        prompts = await off_loop(load_prompts, a.tokenizer, source)
        outs = await _greedy(engine, (a, b), [p.ids for p in prompts], req.max_tokens)
        report["free_running"] = free_running_section(outs, req.max_tokens,
                                                      "request" if req.prompts else "builtin")
    report["seconds"] = round(time.perf_counter() - start, 2)
    return report


def _pair(state, req: CompareRequest) -> tuple[Variant, Variant]:
    known = {v.name: v for v in state.variants}
    shadow = state.shadow.reference if state.shadow is not None else None
    if shadow is not None:
        known.setdefault(shadow.name, shadow)
    default_a = shadow or state.variants[0]
    a = _lookup(state, known, req.a, "a") if req.a else default_a
    if req.b:
        b = _lookup(state, known, req.b, "b")
    else:
        others = [v for v in state.variants if v is not a]
        if not others:
            raise bad("b", f"this server has only {a.name}; name 'b' (or serve --variants, "
                      "or --shadow a reference)")
        b = others[0]
    return a, b


def _lookup(state, known: dict, name: str, param: str) -> Variant:
    if name in known:
        return known[name]
    if name == state.variants[0].model:
        return state.variants[0]
    raise APIError(404, f"the variant {name!r} is not loaded; this server has "
                   f"{', '.join(known)}", param=param, code="model_not_found")


async def _greedy(engine: AsyncEngine, sides: tuple[Variant, Variant], prompts: list[list[int]],
                  max_tokens: int) -> list[list[list[int]]]:
    """Greedy outputs of each side for each prompt, through the live batch."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    sink: asyncio.Queue = asyncio.Queue()
    streams, outs = [], [[None] * len(prompts) for _ in sides]
    try:
        for side, v in enumerate(sides):
            for i, ids in enumerate(prompts):
                streams.append(engine.submit(v, ids, params, sink, tag=side * len(prompts) + i))
        left = len(streams)
        while left:
            tag, out = await sink.get()
            if isinstance(out, Exception):
                raise out
            if out.finished:
                outs[tag // len(prompts)][tag % len(prompts)] = list(out.token_ids)
                left -= 1
    finally:
        for s in streams:
            engine.abort(s)
    return outs
