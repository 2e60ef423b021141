"""The comparison PNG: written, decodable, the expected size, not blank; also for A against A
(every KLD 0, no free-running data), where no warning may escape."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from matplotlib.image import imread

from engine.eval.plot import DPI, FIGSIZE, PlotData, write_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = imread(path)
    height, width = img.shape[:2]
    assert abs(width - FIGSIZE[0] * DPI) <= 2
    assert abs(height - FIGSIZE[1] * DPI) <= 2
    assert float(img[..., :3].std()) > 0


def test_write_png_random_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    kld = rng.gamma(0.5, 0.02, size=2000)
    kld[:100] = 0.0  # some tokens where A and B agree exactly
    dp = np.clip(rng.normal(0.0, 0.05, size=2000), -1.0, 1.0)
    chunk = kld.reshape(16, -1).mean(axis=1)
    survival = [(0, 1.0)] + [(p, float(np.exp(-p / 40))) for p in range(5, 128, 7)]
    data = PlotData(a="bf16", b="int4-g128", kld=kld.tolist(), dp=dp.tolist(),
                    chunk_kld=chunk.tolist(), survival=survival, max_tokens=128)
    out = write_png(tmp_path / "new" / "dir" / "cmp.png", data)
    assert out == tmp_path / "new" / "dir" / "cmp.png"
    _check_png(out)


def test_write_png_identical_variants(tmp_path: Path) -> None:
    data = PlotData(a="bf16", b="bf16", kld=[0.0] * 500, dp=[0.0] * 500, chunk_kld=[0.0] * 4,
                    survival=[], max_tokens=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            out = write_png(str(tmp_path / "same.png"), data)
    assert isinstance(out, Path)
    _check_png(out)
