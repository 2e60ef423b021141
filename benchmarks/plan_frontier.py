"""The frontier of `nibble plan`: weight bytes against measured KLD, plans and uniform formats.

From a scan (`nibble plan --scan --out DIR`, then --scan DIR/scan.json), plans are made at the
weight bytes of each uniform format the scan covers and halfway between neighbours; every plan
and every uniform format is then measured as `nibble compare` measures (teacher-forced KLD
against bf16 on the held-out corpus, 95% bootstrap intervals over chunks), the bf16 reference
scored once. The check the issue asks for: the plan at the bytes of uniform int4 (g128) has a
lower mean KLD than uniform int4, with intervals that do not overlap. Weights are counted as
`nibble inspect` counts them, without the CPU's fp16 GEMM copies (NIBBLE_TUNE=0, so no
load-time timing adds one). Writes JSON and a PNG under benchmarks/results/.

    python benchmarks/plan_frontier.py --scan nibble-scan/scan.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["NIBBLE_TUNE"] = "0"  # no fbgemm copy in the byte counts; numerics independent of timing


class _Memo:
    """The reference LLM with its scores kept per chunk: one bf16 pass serves every variant."""

    def __init__(self, llm):
        self.llm, self.loaded, self.tokenizer, self.model = llm, llm.loaded, llm.tokenizer, llm.model
        self._scores: dict[tuple, object] = {}

    def score(self, ids):
        key = tuple(ids)
        if key not in self._scores:
            self._scores[key] = self.llm.score(ids)
        return self._scores[key]


def uniform_bytes(scan, fmt: str) -> int:
    """Weights of `--quant fmt`: every module at fmt but lm_head, which stays 16-bit."""
    total = scan.fixed_bytes
    for m in scan.modules:
        option = next(o for o in m.options if o.format == fmt)
        total += m.wide_bytes if m.name == "lm_head" else option.nbytes
    return total


def budgets(scan) -> list[tuple[str, int]]:
    """The uniform formats' bytes, and the midpoints between neighbours."""
    points = sorted({uniform_bytes(scan, f) for f in scan.formats})
    mids = [(a + b) // 2 for a, b in zip(points, points[1:], strict=False)]
    return [(f"plan@{b / 2**20:.2f}MiB", b) for b in sorted(points + mids)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", type=Path, required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from benchmarks.machine import machine_info, write_report
    from engine import LLM, sensitivity
    from engine.config import EngineConfig
    from engine.config_files import read_config
    from engine.eval import CompareOptions, compare
    from engine.loader import reader_cache
    from engine.report import total_bytes

    scan = sensitivity.Scan.from_json(args.scan.read_text())
    opts = CompareOptions(ctx=args.ctx, chunks=args.chunks, free_running=False, cost=False)
    rows = []
    with reader_cache(), tempfile.TemporaryDirectory() as tmp:
        ref = _Memo(LLM(scan.model, quant="bf16", progress=False))
        variants = [("uniform", f, None, EngineConfig(model=scan.model, quant=f))
                    for f in scan.formats]
        for label, budget in budgets(scan):
            plan = sensitivity.plan(scan, budget)
            path = sensitivity.write_plan(Path(tmp) / f"{label}.toml", scan.model, plan)
            variants.append(("plan", label, plan, EngineConfig.from_dict(read_config(str(path)))))
        for kind, label, plan, cfg in variants:
            start = time.perf_counter()
            llm = LLM(config=cfg, progress=False)
            tf = compare(ref, llm, "bf16", label, opts, progress=False).report["teacher_forced"]
            row = {"kind": kind, "label": label, "weight_bytes": total_bytes(llm.model),
                   "kld": tf["kld"]["mean"], "kld_ci95": tf["kld"]["ci95"],
                   "ppl_ratio": tf["ppl_ratio"]["value"], "seconds": round(time.perf_counter() - start, 1)}
            if plan is not None:
                row.update(budget=plan.budget, predicted_kld=plan.kld,
                           formats=dict(Counter(plan.assignment.values()).most_common()))
            rows.append(row)
            print(f"{label}: {row['weight_bytes'] / 2**20:.2f} MiB, KLD {row['kld']:.4f} "
                  f"{row['kld_ci95']}", file=sys.stderr, flush=True)
            del llm
    check = _check(scan, rows)
    report = {"benchmark": "plan_frontier", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "model": scan.model, "scan": {"file": args.scan.name, "formats": scan.formats,
                                            "scored_tokens": scan.scored_tokens,
                                            "seconds": scan.seconds,
                                            "calibration": scan.calibration},
              "compare": {"corpus": "builtin", "ctx": args.ctx, "chunks": args.chunks},
              "check_plan_at_int4_bytes": check, "machine": machine_info(), "rows": rows}
    lines = ["| variant | weights (MiB) | predicted KLD | measured mean KLD (95% CI) | formats |",
             "|---|---:|---:|---|---|"]
    for r in rows:
        pred = f"{r['predicted_kld']:.4f}" if "predicted_kld" in r else "-"
        lo, hi = r["kld_ci95"]
        lines.append(f"| {r['label']} | {r['weight_bytes'] / 2**20:.2f} | {pred} | "
                     f"{r['kld']:.4f} ({lo:.4f}-{hi:.4f}) | "
                     f"{', '.join(f'{n} {f}' for f, n in r.get('formats', {}).items()) or '-'} |")
    out = write_report(report, args.out, "plan-frontier", "\n".join(lines))
    _plot(out.with_suffix(".png"), scan.model, rows)


def _check(scan, rows: list[dict]) -> dict | None:
    """The plan made at uniform int4's bytes against uniform int4."""
    if "int4" not in scan.formats:
        return None
    budget = uniform_bytes(scan, "int4")
    uni = next(r for r in rows if r["kind"] == "uniform" and r["label"] == "int4")
    plan = next(r for r in rows if r["kind"] == "plan" and r["budget"] == budget)
    return {"budget": budget, "plan": plan["label"], "plan_kld": plan["kld"],
            "plan_ci95": plan["kld_ci95"], "int4_kld": uni["kld"], "int4_ci95": uni["kld_ci95"],
            "plan_bytes_within_budget": plan["weight_bytes"] <= budget,
            "lower_without_overlap": plan["kld_ci95"][1] < uni["kld_ci95"][0]}


def _plot(path: Path, model: str, rows: list[dict]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    plans = sorted((r for r in rows if r["kind"] == "plan"), key=lambda r: r["weight_bytes"])
    for group, style in ((plans, "o-"), ([r for r in rows if r["kind"] == "uniform"], "s")):
        x = [r["weight_bytes"] / 2**20 for r in group]
        y = [r["kld"] for r in group]
        err = [[r["kld"] - r["kld_ci95"][0] for r in group], [r["kld_ci95"][1] - r["kld"] for r in group]]
        ax.errorbar(x, y, yerr=err, fmt=style, capsize=3,
                    label="nibble plan" if group is plans else "uniform --quant")
    for r in rows:
        if r["kind"] == "uniform":
            ax.annotate(r["label"], (r["weight_bytes"] / 2**20, r["kld"]), textcoords="offset points",
                        xytext=(6, 4), fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("weights (MiB, as nibble inspect counts them)")
    ax.set_ylabel("mean KLD against bf16 (nats, log scale), 95% CI")
    ax.set_title(f"{model}: plans from the sensitivity scan against uniform formats")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, format="png")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
