"""Reconstruction-quality metrics against a known ground truth (simulated data).

Used by ``benchmarks/quality.py``; pure functions on numpy arrays, no I/O.

- Latent ordering: the first principal component of z should order the ground-truth
  conformation ``c``; measured by the Spearman rank correlation (sign-free: ``|rho|``).
- Per-image FSC: the volume decoded at an image's latent against that image's ground-truth
  volume, summarised by the normalised area under the curve up to Nyquist and the 0.5
  crossing (:func:`distdrgn.projection.fsc_resolution`).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from distdrgn.analysis.latent import fit_pca
from distdrgn.projection import fsc_resolution


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two (N,) arrays (ties get their average rank); NaN if one is constant."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"spearman needs two arrays of the same length >= 2, got {a.shape} and {b.shape}")
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def pc_spearman(z: np.ndarray, truth: np.ndarray, n_components: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Spearman correlations of the first principal components of z (N, zdim) with ``truth`` (N,).

    Returns ``(rho, explained_variance_ratio)``, each (min(n_components, zdim),); rho[0] is
    the PC1 correlation (its sign is arbitrary: PCA axes have no orientation).
    """
    z = np.asarray(z, dtype=np.float32)
    if z.ndim == 1:
        z = z[:, None]
    pca = fit_pca(z)
    k = min(n_components, z.shape[1])
    pcs = pca.transform(z, k)
    rho = np.array([spearman(pcs[:, i], truth) for i in range(k)])
    return rho, pca.explained_variance_ratio[:k]


def fsc_auc(freqs: np.ndarray, curve: np.ndarray) -> float:
    """Area under an FSC curve from 0 to Nyquist (0.5 cycles/pixel), divided by 0.5.

    freqs (S,) cycles/pixel ascending from 0, curve (S,). Trapezoid rule; 1.0 for a curve
    that is 1 everywhere, 0 for uncorrelated volumes (on average).
    """
    freqs = np.asarray(freqs, dtype=np.float64)
    curve = np.asarray(curve, dtype=np.float64)
    keep = freqs <= 0.5 + 1e-12
    f, c = freqs[keep], curve[keep]
    return float(np.sum(0.5 * (c[1:] + c[:-1]) * np.diff(f)) / 0.5)


def fsc_summary(freqs: np.ndarray, curve: np.ndarray, apix: float | None = None, threshold: float = 0.5) -> dict:
    """AUC (:func:`fsc_auc`), the ``threshold`` crossing in cycles/pixel and (with ``apix``) Angstrom."""
    cross = fsc_resolution(freqs, curve, threshold)
    out = {"auc": fsc_auc(freqs, curve), "crossing_px": cross}
    if apix:
        out["crossing_A"] = float(apix / cross) if cross > 0 else float("inf")
    return out


def stratified_indices(values: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``n`` items spread evenly over the sorted ``values`` (N,): the items at ranks
    ``round((j + 0.5) N / n)``, j = 0..n-1, returned in ascending order of value. All N if n >= N."""
    values = np.asarray(values).ravel()
    order = np.argsort(values, kind="stable")
    N = order.size
    if n >= N:
        return order
    ranks = np.minimum(((np.arange(n) + 0.5) * N / n).astype(np.int64), N - 1)
    return order[ranks]


def mismatched_partners(n: int, seed: int = 0) -> np.ndarray:
    """A random derangement of 0..n-1 (no element maps to itself): the baseline pairs each
    evaluated image with another image's ground truth. n >= 2."""
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2, got {n}")
    rng = np.random.default_rng(seed)
    # a random cyclic shift of a random permutation has no fixed points
    perm = rng.permutation(n)
    shift = int(rng.integers(1, n))
    partner = np.empty(n, dtype=np.int64)
    partner[perm] = perm[(np.arange(n) + shift) % n]
    return partner


def summarise(values) -> dict:
    """Mean, median, 10th and 90th percentiles of a list of numbers."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "median": float(np.median(v)), "p10": float(np.percentile(v, 10)),
            "p90": float(np.percentile(v, 90)), "n": int(v.size)}  # fmt: skip
