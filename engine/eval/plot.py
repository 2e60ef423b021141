"""The PNG of an A/B comparison: four panels showing the per-token KL divergence distribution, the
Δp histogram, the running mean KLD over chunks with its 95% band, and the survival curve of greedy
free-running agreement. Drawn with matplotlib's Agg canvas directly (no pyplot), so it is
thread-safe, never opens a window and leaves global state alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # matplotlib loads on the first plot, not with engine.eval (the server imports it)
    from matplotlib.axes import Axes

FIGSIZE = (11.0, 8.0)
DPI = 110
KLD_BINS = 60
DP_BINS = 81
Z95 = 1.96


@dataclass(frozen=True)
class PlotData:
    a: str  # label of A (the reference), e.g. "bf16"
    b: str  # label of B, e.g. "int4-g128"
    kld: Sequence[float]  # per scored token: KL(A || B), nats, >= 0
    dp: Sequence[float]  # per scored token: p_B(y) - p_A(y), in [-1, 1]
    chunk_kld: Sequence[float]  # mean KLD per corpus chunk, in corpus order
    survival: Sequence[tuple[int, float]]  # Kaplan-Meier (position, fraction still agreeing)
    max_tokens: int  # generation length of the free-running part


def write_png(path: str | Path, data: PlotData) -> Path:
    """Draw `data` as a 2x2 figure into `path`, creating its parent directory; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Fixed margins rather than a layout engine: the size never changes, and it draws once, not twice.
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    try:
        fig.suptitle(f"{data.b} vs {data.a}", fontsize=14)
        (ax_kld, ax_dp), (ax_run, ax_surv) = fig.subplots(2, 2)
        fig.subplots_adjust(left=0.07, right=0.985, bottom=0.07, top=0.91, wspace=0.2, hspace=0.3)
        _kld_panel(ax_kld, _finite(data.kld))
        _dp_panel(ax_dp, _finite(data.dp))
        _running_panel(ax_run, _finite(data.chunk_kld))
        _survival_panel(ax_surv, data.survival, data.max_tokens)
        fig.savefig(out, format="png", dpi=DPI)
    finally:
        fig.clear()
    return out


def _finite(values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]


def _message(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11,
            color="0.35")
    ax.set_xticks([])
    ax.set_yticks([])


def _kld_panel(ax: Axes, kld: np.ndarray) -> None:
    ax.set_title("KL divergence per token, KL(A || B)")
    n = kld.size
    if n == 0:
        _message(ax, "no tokens scored")
        return
    kld = np.maximum(kld, 0.0)
    positive = kld[kld > 0]
    zeros = n - positive.size
    if positive.size == 0:
        _message(ax, f"all {n} tokens: KLD 0")
        return
    lo, hi = float(positive.min()), float(positive.max())
    if hi <= lo * 1.0001:  # a single value: give the bins some width around it
        lo, hi = lo / 2.0, hi * 2.0
    bins = np.geomspace(lo, hi, KLD_BINS + 1)
    ax.hist(positive, bins=bins, color="tab:blue", alpha=0.75)
    ax.set_xscale("log")
    ax.set_xlabel("KLD (nats, log scale)")
    ax.set_ylabel("tokens")
    # Summaries are over all tokens, zeros included; a zero one cannot sit on a log axis.
    marks = (("mean", float(kld.mean()), "tab:red", "-"),
             ("median", float(np.median(kld)), "tab:green", "--"),
             ("p99", float(np.percentile(kld, 99)), "tab:purple", ":"))
    for name, value, color, style in marks:
        if value > 0:
            ax.axvline(value, color=color, linestyle=style, linewidth=1.5,
                       label=f"{name} {value:.3g}")
        else:
            ax.plot([], [], " ", label=f"{name} 0")
    if zeros:
        ax.plot([], [], " ", label=f"{zeros} tokens with KLD 0")
    ax.legend(fontsize=8, loc="upper left")


def _dp_panel(ax: Axes, dp: np.ndarray) -> None:
    ax.set_title("Δp of the true token, p_B − p_A")
    if dp.size == 0:
        _message(ax, "no tokens scored")
        return
    dp = np.clip(dp, -1.0, 1.0)
    lim = float(np.abs(dp).max())
    lim = 0.01 if lim == 0 else min(1.0, max(lim * 1.05, 1e-3))
    ax.hist(dp, bins=np.linspace(-lim, lim, DP_BINS + 1), color="tab:orange", alpha=0.8, log=True)
    ax.set_xlim(-lim, lim)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, symmetric=True))
    ax.axvline(0.0, color="0.4", linewidth=0.8)
    ax.set_xlabel("Δp")
    ax.set_ylabel("tokens (log scale)")
    rms = math.sqrt(float(np.mean(dp * dp)))
    ax.text(0.98, 0.95, f"RMS Δp {rms:.3g}\nmean Δp {float(dp.mean()):+.3g}\n{dp.size} tokens",
            transform=ax.transAxes, ha="right", va="top", fontsize=9,
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})


def _running_panel(ax: Axes, chunks: np.ndarray) -> None:
    ax.set_title("Running mean KLD over chunks, 95% interval")
    n = chunks.size
    if n == 0:
        _message(ax, "no chunks")
        return
    k = np.arange(1, n + 1, dtype=np.float64)
    mean = np.cumsum(chunks) / k
    ax.plot(k, mean, marker="o", markersize=3, color="tab:blue", label="mean of first k chunks")
    if n >= 2:
        # Sample sd of the first k chunk means (k >= 2): sum of squared deviations / (k - 1).
        sq = np.cumsum(chunks * chunks)
        var = np.maximum(sq[1:] - k[1:] * mean[1:] ** 2, 0.0) / (k[1:] - 1.0)
        half = Z95 * np.sqrt(var / k[1:])
        ax.fill_between(k[1:], np.maximum(mean[1:] - half, 0.0), mean[1:] + half,
                        color="tab:blue", alpha=0.2, linewidth=0, label="± 1.96 sd/√k")
    ax.set_xlim(0.5, n + 0.5)
    ax.set_ylim(bottom=0.0)
    if n <= 12:
        ax.set_xticks(range(1, n + 1))
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("chunks so far")
    ax.set_ylabel("mean KLD (nats)")
    ax.legend(fontsize=8, loc="upper right")


def _survival_panel(ax: Axes, survival: Sequence[tuple[int, float]], max_tokens: int) -> None:
    ax.set_title("Free-running: outputs still identical")
    if not survival:
        _message(ax, "no free-running data")
        return
    pos = np.asarray([p for p, _ in survival], dtype=np.float64)
    frac = np.clip(np.asarray([s for _, s in survival], dtype=np.float64), 0.0, 1.0)
    right = float(max(max_tokens, pos.max(), 1))
    if pos[-1] < right:  # carry the last level to the end of the generation
        pos, frac = np.append(pos, right), np.append(frac, frac[-1])
    ax.step(pos, frac, where="post", color="tab:green", linewidth=1.8, label="Kaplan-Meier")
    ax.axhline(0.5, color="0.4", linestyle="--", linewidth=1.0, label="0.5")
    below = np.nonzero(frac <= 0.5)[0]
    if below.size:
        at = float(pos[below[0]])
        ax.axvline(at, color="tab:red", linestyle=":", linewidth=1.0,
                   label=f"median first divergence: {at:g}")
    else:
        ax.plot([], [], " ", label=f"median first divergence > {right:g}")
    ax.set_xlim(0.0, right)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("token position")
    ax.set_ylabel("fraction of prompts")
    ax.legend(fontsize=8, loc="lower left")
