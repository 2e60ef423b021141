"""The PNG of a sensitivity scan: every (module, format) at its bytes saved against 16-bit (x)
and its KLD (y, log scale), coloured by format, the most sensitive modules labelled. Drawn on
matplotlib's Agg canvas directly, as engine/eval/plot.py draws, so it never opens a window."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from engine.sensitivity.results import Scan

FIGSIZE = (11.0, 7.0)
DPI = 110
LABELS = 8  # modules labelled: those with the highest KLD at any format
LABEL_PX = (90.0, 12.0)  # room a label of 8-point text takes, pixels at DPI


def write_scan_png(path: str | Path, scan: Scan, labels: int = LABELS) -> Path:
    """Draws `scan` into `path` (its parent directory created); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    try:
        ax = fig.subplots()
        fig.subplots_adjust(left=0.08, right=0.98, bottom=0.09, top=0.9)
        kld = np.array([[o.kld for o in m.options] for m in scan.modules])  # [modules, formats]
        saved = np.array([[m.saved(o) for o in m.options] for m in scan.modules]) / 2**20
        positive = kld[kld > 0]
        floor = positive.min() / 2 if positive.size else 1e-12  # KLD 0 sits on the bottom edge
        shown = np.maximum(kld, floor)
        for i, fmt in enumerate(scan.formats):
            ax.scatter(saved[:, i], shown[:, i], s=18, color=f"C{i}", alpha=0.8, label=fmt)
        ax.set_yscale("log")
        ax.margins(x=0.1)  # room for the labels of the modules that save the most
        worst = np.argsort(-kld.max(1))[:labels]
        peak = kld.argmax(1)  # each module labelled at its costliest format
        _label(ax, [(_short(scan.modules[m].name), saved[m, peak[m]], shown[m, peak[m]])
                    for m in worst])
        ax.set_xlabel("bytes saved against 16-bit (MiB)")
        ax.set_ylabel("mean KLD against 16-bit, one module quantized (nats, log scale)")
        ax.set_title(f"{scan.model}: {len(scan.modules)} modules, {scan.chunks} chunks x "
                     f"{scan.ctx} tokens, {scan.seconds:.0f} s")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=9, loc="best")
        fig.savefig(out, format="png", dpi=DPI)
    finally:
        fig.clear()
    return out


def _label(ax, points: list[tuple[str, float, float]]) -> None:
    """Annotates each (text, x, y), highest y first; a label that would cover one placed
    before moves down a line, with a leader to its point (modules of one shape share an x)."""
    ax.autoscale_view()
    placed: list[tuple[float, float]] = []  # label anchors, pixels
    for text, x, y in sorted(points, key=lambda p: -p[2]):
        px, py = ax.transData.transform((x, y))
        drop = 0.0
        while any(abs(px - qx) < LABEL_PX[0] and abs(py - drop - qy) < LABEL_PX[1]
                  for qx, qy in placed):
            drop += LABEL_PX[1]
        placed.append((px, py - drop))
        ax.annotate(text, (x, y), xytext=(4, 3 - drop * 72 / DPI), textcoords="offset points",
                    fontsize=8, arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5}
                    if drop else None)


def _short(name: str) -> str:
    """layers.12.mlp.down_proj -> 12.down_proj"""
    return re.sub(r"^layers\.(\d+)\.(?:self_attn|mlp)\.", r"\1.", name)
