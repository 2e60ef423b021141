"""What the fused CPU decode step's activations cost in quality: int8 against fp32 inputs to
its int4 GEMMs (EngineConfig.decode_activations), and both against the eager layers, as KL
divergence from bf16 at positions whose context is the same token for token on every side.

`nibble compare` and benchmarks/quality.py measure teacher-forced, which runs the prefill path
(the eager layers); a pure decode step runs the fused C++ step instead. Here each of --prompts
windows of --ctx tokens of the comparison corpus is generated from with max_tokens=2: the
first token comes from the prefill (identical for both activation modes of a format), the
second step's logits from the fused decode step on prompt + that token. The bf16 model and
the format's eager layers score the same prompt + token. Positions are grouped in eights for
95% bootstrap intervals (engine/eval/stats.py); `int8 - fp32` is the paired difference.

    python benchmarks/decode_quality.py                      # int4 and int4-g32, 192 prompts
    python benchmarks/decode_quality.py --formats int4 --prompts 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import machine_info, write_report  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.eval import stats, texts  # noqa: E402

GROUP = 8  # positions per bootstrap group


def fused_logits(llm: LLM, prompt: list[int]) -> tuple[int, torch.Tensor]:
    """(the prefill's greedy token, the fused decode step's logits after it)."""
    model, seen, fused = llm.model, [], []
    real_layers, real_logits = model._native_layers, model.logits
    model._native_layers = lambda *a: fused.append(1) or real_layers(*a)
    model.logits = lambda h: seen.append(real_logits(h)) or seen[-1]
    try:
        out = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                           use_tqdm=False)
    finally:
        del model._native_layers, model.logits
    if fused != [1] or len(seen) < 2:
        raise RuntimeError("the second step did not run the fused decode step")
    return out[0].token_ids[0], seen[-1][-1].float()


def summary(kld: torch.Tensor, top1: torch.Tensor) -> dict:
    groups = [stats.TokenStats(k, t, k * 0, k * 0, k * 0)
              for k, t in zip(kld.split(GROUP), top1.split(GROUP), strict=True)]
    s = stats.summarize(groups)
    return {"kld": s["kld"], "top1_agreement": s["top1_agreement"]}


def paired(a: torch.Tensor, b: torch.Tensor, reps: int = 2000) -> dict:
    """mean of a - b with a 95% bootstrap interval over groups of positions."""
    d = (a - b).double().view(-1, GROUP).mean(1)
    idx = torch.randint(0, len(d), (reps, len(d)), generator=torch.Generator().manual_seed(0))
    boot = d[idx].mean(1)
    return {"mean": round(d.mean().item(), 6),
            "ci95": [round(boot.quantile(0.025).item(), 6), round(boot.quantile(0.975).item(), 6)]}


def kld_top1(ref: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    la, lb = ref.log_softmax(-1), other.log_softmax(-1)
    return (la.exp() * (la - lb)).sum(-1).clamp_min(0.0), la.argmax(-1) == lb.argmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--formats", default="int4,int4-g32")
    ap.add_argument("--prompts", type=int, default=192, help="positions (a multiple of 8)")
    ap.add_argument("--ctx", type=int, default=128, help="tokens per prompt window")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.prompts < 2 * GROUP or args.prompts % GROUP:
        ap.error(f"--prompts must be a multiple of {GROUP}, at least {2 * GROUP}")

    start = time.time()
    base = LLM(args.model, quant="bf16", progress=False)
    text, corpus = texts.corpus_text(texts.BUILTIN)
    prompts = [c[:-1] for c in texts.corpus_chunks(base.tokenizer, text, args.ctx, args.prompts)]
    rows = []
    for fmt in args.formats.split(","):
        side, first = {}, None
        for mode in ("fp32", "int8"):
            llm = LLM(args.model, quant=fmt, progress=False, decode_activations=mode)
            if llm.model.native_decode is None:
                raise SystemExit(f"{fmt}: the fused decode step does not run here")
            got = [fused_logits(llm, p) for p in prompts]
            tokens = [t for t, _ in got]
            if first is None:
                first = tokens
                contexts = [p + [t] for p, t in zip(prompts, tokens, strict=True)]
                ref = torch.stack([base.score(c)[-1].float() for c in contexts])
                eager = torch.stack([llm.score(c)[-1].float() for c in contexts])
                side["eager"] = kld_top1(ref, eager)
            elif tokens != first:
                raise RuntimeError(f"{fmt}: the prefill's tokens differ between modes")
            side[mode] = kld_top1(ref, torch.stack([lg for _, lg in got]))
            del llm
        for name, label in (("eager", "eager layers (prefill path)"),
                            ("fp32", "fused decode, fp32 activations"),
                            ("int8", "fused decode, int8 activations")):
            rows.append({"format": fmt, "path": label, **summary(*side[name])})
        rows.append({"format": fmt, "path": "int8 - fp32 (paired)",
                     "kld_difference": paired(side["int8"][0], side["fp32"][0])})
        print(f"{fmt}: done ({time.time() - start:.0f} s)", file=sys.stderr)

    report = {"benchmark": "decode_quality", "machine": machine_info(), "model": args.model,
              "corpus": corpus, "prompts": args.prompts, "ctx": args.ctx,
              "seconds": round(time.time() - start, 1), "rows": rows}
    lines = ["| format | path | mean KLD vs bf16 (95% CI) | p99 KLD | top-1 agreement |",
             "|---|---|---|---:|---:|"]
    for r in rows:
        if "kld_difference" in r:
            d = r["kld_difference"]
            lines.append(f"| {r['format']} | {r['path']} | {d['mean']:+.4f} "
                         f"({d['ci95'][0]:+.4f} to {d['ci95'][1]:+.4f}) | | |")
            continue
        k, t = r["kld"], r["top1_agreement"]
        lines.append(f"| {r['format']} | {r['path']} | {k['mean']:.4f} ({k['ci95'][0]:.4f}-"
                     f"{k['ci95'][1]:.4f}) | {k['p99']:.3f} | {100 * t['value']:.1f}% |")
    write_report(report, args.out, "decode-quality", "\n".join(lines))


if __name__ == "__main__":
    main()
