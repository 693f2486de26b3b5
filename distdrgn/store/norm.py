"""Normalisation statistics of stored images, accumulated shard by shard.

The store records, per level, the real-space mean/std of a seeded random subset of up to
:data:`NORM_SAMPLE` images and the standard deviation of their symmetrised centred Hartley
transforms, with (``ht_std``) and without (``ht_std_nowindow``) the default real-space
window (docs/conventions.md). The training loader divides the symmetrised HT by ``ht_std`` and
takes the mean as 0, as cryoDRGN does; ``std`` here is the usual standard deviation about
the sample mean (numpy's ``std``), which is what cryoDRGN records as the scale.

Sums are kept in float64 so that per-shard partial results can be added in any order.
"""

from __future__ import annotations

import numpy as np
import torch

from distdrgn.fft import ht2_center, symmetrize_ht, window_mask

NORM_SAMPLE = 1000
NORM_SEED = 0
_KEYS = ("real", "ht", "ht_nowindow")


def sample_positions(n: int, size: int = NORM_SAMPLE, seed: int = NORM_SEED) -> np.ndarray:
    """Sorted positions of the images the statistics are taken on (same for every level)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(n, size), replace=False)).astype(np.int64)


def partial_sums(images: np.ndarray, block: int = 8) -> dict:
    """(k, D, D) images -> {"n_images", "<key>": [count, sum, sum of squares]} in float64.

    Works ``block`` images at a time: the float64 transforms take ~10x the images' memory.
    """
    totals = {key: np.zeros(3) for key in _KEYS}
    if len(images):
        win = window_mask(images.shape[-1]).to(torch.float64)
    for i in range(0, len(images), block):
        x = torch.from_numpy(np.asarray(images[i : i + block], dtype=np.float64))
        for key, value in (
            ("real", x),
            ("ht", symmetrize_ht(ht2_center(x * win))),
            ("ht_nowindow", symmetrize_ht(ht2_center(x))),
        ):
            totals[key] += [float(value.numel()), float(value.sum()), float((value * value).sum())]
    out: dict = {"n_images": int(len(images))}
    out.update({key: totals[key].tolist() for key in _KEYS})
    return out


def combine(parts: list[dict]) -> dict:
    """Sum of :func:`partial_sums` results -> {"mean", "std", "ht_std", "ht_std_nowindow", "n_sampled"}."""
    totals = {key: np.zeros(3) for key in _KEYS}
    n_images = 0
    for p in parts:
        n_images += p["n_images"]
        for key in _KEYS:
            totals[key] += np.asarray(p[key], dtype=np.float64)

    def mean_std(t):
        count, s, ss = t
        if count == 0:
            return 0.0, 1.0
        mean = s / count
        return float(mean), float(np.sqrt(max(ss / count - mean * mean, 0.0)))

    mean, std = mean_std(totals["real"])
    return {
        "mean": mean,
        "std": std,
        "ht_std": mean_std(totals["ht"])[1],
        "ht_std_nowindow": mean_std(totals["ht_nowindow"])[1],
        "n_sampled": n_images,
    }
