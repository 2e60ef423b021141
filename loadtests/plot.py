"""The PNG of a `nibble bench serve` report: output tokens/s, TTFT and inter-token latency
(p50 solid, p99 dashed) over time, one colour per target; the fourth panel is goodput against
the offered rate for ramps, and the server's resident memory otherwise."""

from __future__ import annotations

from pathlib import Path

FIGSIZE = (12.0, 8.0)
DPI = 100


def write_png(path: Path, doc: dict) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    (thr, ttft), (itl, last) = fig.subplots(2, 2)
    colours = [f"C{i}" for i in range(10)]
    ramped = any(r["stages"] and r["stages"][0]["rate"] for r in doc["targets"]) and \
        doc["profile"] in ("ramp", "overload")
    for i, r in enumerate(doc["targets"]):
        s, c = r["series"], colours[i % len(colours)]
        thr.plot(s["t"], s["tokens_per_s"], color=c, label=r["label"])
        for ax, key in ((ttft, "ttft"), (itl, "itl")):
            ax.plot(s["t"], _nan(s[f"{key}_p50_ms"]), color=c, label=f"{r['label']} p50")
            ax.plot(s["t"], _nan(s[f"{key}_p99_ms"]), color=c, linestyle="--", label=f"{r['label']} p99")
        if ramped:
            stages = sorted((st["summary"]["offered_rps"] or st["rate"], st["summary"]["goodput"]["ratio"])
                            for st in r["stages"])
            last.plot([x for x, _ in stages], [100 * y for _, y in stages], "o-", color=c, label=r["label"])
        elif s.get("memory"):
            last.plot([t for t, _ in s["memory"]], [mb for _, mb in s["memory"]], color=c, label=r["label"])
    thr.set(title="Output tokens/s", xlabel="seconds")
    ttft.set(title="Time to first token (p50 solid, p99 dashed)", xlabel="seconds", ylabel="ms")
    itl.set(title="Inter-token latency (p50 solid, p99 dashed)", xlabel="seconds", ylabel="ms")
    slo = doc["slo"]
    ttft.axhline(slo["ttft_p99_ms"], color="grey", linewidth=0.8, linestyle=":")
    itl.axhline(slo["itl_p99_ms"], color="grey", linewidth=0.8, linestyle=":")
    if ramped:
        last.axhline(100 * slo["goodput_ratio"], color="grey", linewidth=0.8, linestyle=":")
        last.set(title="Goodput / offered load", xlabel="offered req/s", ylabel="%")
    else:
        last.set(title="Server resident memory", xlabel="seconds", ylabel="MB")
        if not last.lines:
            last.text(0.5, 0.5, "the server exports no process_resident_memory_bytes",
                      ha="center", va="center", transform=last.transAxes)
    for ax in (thr, ttft, itl, last):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"nibble bench serve: {doc['profile']}, {doc['workload']['api']} "
                 f"{doc['workload']['prompts']} prompts, {doc['workload']['max_tokens']} tokens")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _nan(values: list) -> list[float]:
    return [float("nan") if v is None else v for v in values]
