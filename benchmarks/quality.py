"""What each storage format costs in quality, against bf16 on the same weights.

Teacher-forced on CPython's pydoc_data.topics (ships with every Python): fixed-length chunks,
the second half of each chunk scored (every scored token sees at least ctx/2 of context, as
llama.cpp's perplexity tool does). Per format: mean KL divergence of its next-token
distribution from bf16's with a 95% bootstrap interval over chunks, p99 KLD, the rate at which
the top-1 token agrees with bf16's, and perplexity. Writes JSON under benchmarks/results/.

    python benchmarks/quality.py                         # default formats, 8 chunks of 512
    python benchmarks/quality.py --formats int4,int4-g32 --chunks 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import machine_info  # noqa: E402
from engine import LLM  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def corpus_chunks(tokenizer, ctx: int, n: int) -> list[list[int]]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer.encode(text[: ctx * n * 8])
    if len(ids) < ctx * n:
        raise SystemExit(f"corpus has {len(ids)} tokens, fewer than {ctx} x {n}")
    return [ids[i * ctx:(i + 1) * ctx] for i in range(n)]


def scored_logprobs(llm: LLM, chunk: list[int]) -> torch.Tensor:
    """log-probabilities [ctx/2 - 1, vocab] predicting the second half of the chunk."""
    half = len(chunk) // 2
    return torch.log_softmax(llm.score(chunk)[half - 1:-1], -1)


def compare(ref: list[torch.Tensor], test: list[torch.Tensor], chunks, half: int) -> dict:
    kld_chunks, klds, agree, nll = [], [], [], []
    for p, q, chunk in zip(ref, test, chunks, strict=True):
        kld = (p.exp() * (p - q)).sum(-1)
        kld_chunks.append(kld.mean())
        klds.append(kld)
        agree.append((p.argmax(-1) == q.argmax(-1)).float())
        targets = torch.tensor(chunk[half:])
        nll.append(-q.gather(1, targets[:, None])[:, 0])
    per_chunk = torch.stack(kld_chunks)
    lo, hi = bootstrap(per_chunk)
    all_kld = torch.cat(klds)
    return {"mean_kld": round(per_chunk.mean().item(), 5), "mean_kld_ci95": [round(lo, 5), round(hi, 5)],
            "p99_kld": round(all_kld.quantile(0.99).item(), 4),
            "top1_agreement": round(torch.cat(agree).mean().item(), 4),
            "ppl": round(torch.cat(nll).mean().exp().item(), 3)}


def bootstrap(per_chunk: torch.Tensor, reps: int = 2000) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(per_chunk), (reps, len(per_chunk)), generator=g)
    means = per_chunk[idx].mean(1)
    return means.quantile(0.025).item(), means.quantile(0.975).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--formats", default="int8,int4-g32,int4-g64,int4,int4-sym,nf4")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    base = LLM(args.model, quant="bf16", progress=False, max_model_len=args.ctx)
    chunks = corpus_chunks(base.tokenizer, args.ctx, args.chunks)
    ref = [scored_logprobs(base, c) for c in chunks]
    rows = [{"format": "bf16", **compare(ref, ref, chunks, args.ctx // 2)}]
    for fmt in args.formats.split(","):
        llm = LLM(args.model, quant=fmt, progress=False, max_model_len=args.ctx)
        rows.append({"format": fmt, **compare(ref, [scored_logprobs(llm, c) for c in chunks],
                                               chunks, args.ctx // 2)})
        print(f"{fmt:>10}: mean KLD {rows[-1]['mean_kld']:.4f}", file=sys.stderr)
        del llm
    report = {"benchmark": "quality", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "model": args.model, "reference": "bf16", "corpus": "pydoc_data.topics",
              "ctx": args.ctx, "chunks": args.chunks, "scored_tokens": args.chunks * (args.ctx // 2),
              "machine": machine_info(), "results": rows}
    out = args.out or RESULTS / f"quality-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("| format | mean KLD vs bf16 (95% CI) | p99 KLD | top-1 agreement | PPL |\n|---|---|---:|---:|---:|")
    for r in rows:
        lo, hi = r["mean_kld_ci95"]
        print(f"| {r['format']} | {r['mean_kld']:.4f} ({lo:.4f}-{hi:.4f}) | {r['p99_kld']:.3f} | "
              f"{100 * r['top1_agreement']:.1f}% | {r['ppl']:.2f} |")
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
