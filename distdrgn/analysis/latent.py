"""Latent-space analysis: PCA, k-means, on-data centres, PC traversals and UMAP.

Everything here is linear (or near-linear) in the number of particles N and works in
chunks, so a 1M+ particle run analyses in seconds to minutes:

- PCA diagonalises the zdim x zdim covariance accumulated in one streaming pass
  (no N x zdim SVD, no randomised approximation).
- k-means uses faiss (multi-threaded; GPU when one is visible to faiss).
- The on-data centre of each cluster is the particle nearest to its centroid, found with
  chunked distance blocks of shape (chunk, K).
- UMAP is fitted on a random subsample of at most ``max_fit`` points; the other points are
  placed with ``transform``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distdrgn import checkpoint
from distdrgn.errors import DistdrgnError, FormatError

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 262_144


def load_z(path: str | Path) -> np.ndarray:
    """Load the latent means from a cryoDRGN-style ``z.pkl``.

    The file holds two consecutive pickles, ``z_mu`` then ``z_logvar`` (N x zdim each);
    only the first is read. Returns z_mu as float32 (N, zdim).
    """
    z = checkpoint.load_z(path)[0]
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or z.shape[0] == 0:
        raise FormatError(f"{path}: expected an N x zdim array, got shape {z.shape}")
    if not np.isfinite(z).all():
        raise FormatError(f"{path}: latent array contains NaN or inf")
    return z


@dataclass(frozen=True)
class PCA:
    """A PCA of latent vectors.

    mean: (zdim,); components: (zdim, zdim), row i is the i-th principal axis (unit
    length, sign fixed so that its largest-magnitude entry is positive);
    explained_variance: (zdim,) variance along each axis, descending.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        total = float(self.explained_variance.sum())
        if total <= 0:
            return np.zeros_like(self.explained_variance)
        return self.explained_variance / total

    def transform(self, z: np.ndarray, n_components: int | None = None) -> np.ndarray:
        """Project z (N, zdim) onto the first ``n_components`` axes -> (N, n_components) float32."""
        comps = self.components if n_components is None else self.components[:n_components]
        out = np.empty((z.shape[0], comps.shape[0]), dtype=np.float32)
        for start in range(0, z.shape[0], DEFAULT_CHUNK):
            block = z[start : start + DEFAULT_CHUNK].astype(np.float64) - self.mean
            out[start : start + DEFAULT_CHUNK] = block @ comps.T
        return out

    def inverse_transform(self, coords: np.ndarray) -> np.ndarray:
        """Map PC coordinates (M, n) back to latent space (M, zdim) float32."""
        coords = np.asarray(coords, dtype=np.float64)
        n = coords.shape[1]
        return (self.mean + coords @ self.components[:n]).astype(np.float32)


def fit_pca(z: np.ndarray, chunk: int = DEFAULT_CHUNK) -> PCA:
    """PCA of z (N, zdim) from the covariance accumulated in one streaming pass.

    Sums are taken about a shift (the mean of the first chunk) in float64 so the one-pass
    formula does not lose precision when the latent mean is far from 0.
    """
    n, zdim = z.shape
    if n < 2:
        raise DistdrgnError(f"PCA needs at least 2 latent vectors, got {n}")
    shift = z[:chunk].astype(np.float64).mean(axis=0)
    total = np.zeros(zdim, dtype=np.float64)
    outer = np.zeros((zdim, zdim), dtype=np.float64)
    for start in range(0, n, chunk):
        block = z[start : start + chunk].astype(np.float64) - shift
        total += block.sum(axis=0)
        outer += block.T @ block
    mean_shifted = total / n
    cov = (outer - n * np.outer(mean_shifted, mean_shifted)) / (n - 1)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    eigval = np.clip(eigval[order], 0.0, None)
    components = eigvec[:, order].T.copy()
    # deterministic signs: largest-magnitude entry of each axis positive
    pivot = np.abs(components).argmax(axis=1)
    signs = np.sign(components[np.arange(zdim), pivot])
    signs[signs == 0] = 1.0
    components *= signs[:, None]
    return PCA(mean=shift + mean_shifted, components=components, explained_variance=eigval)


def faiss_gpu_available() -> bool:
    """Whether the installed faiss can run on a GPU (faiss-cpu never can)."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return bool(get and get() > 0)


def kmeans(
    z: np.ndarray,
    k: int,
    seed: int = 0,
    niter: int = 50,
    nredo: int = 3,
    max_points_per_centroid: int = 10_000,
    use_gpu: bool | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """k-means clustering of z (N, zdim) with faiss.

    faiss trains on at most ``k * max_points_per_centroid`` randomly sampled points (the
    rest add little to the centroids); every point is then assigned to its nearest
    centroid. ``nredo`` restarts keep the best objective. ``use_gpu=None`` uses a GPU when
    faiss sees one. Returns (labels (N,) int64, centroids (k, zdim) float32).
    """
    import faiss

    n, zdim = z.shape
    if k < 1:
        raise DistdrgnError(f"k-means needs k >= 1, got {k}")
    if n < k:
        raise DistdrgnError(f"k-means with k={k} needs at least {k} particles, got {n}")
    if use_gpu is None:
        use_gpu = faiss_gpu_available()
    x = np.ascontiguousarray(z, dtype=np.float32)
    km = faiss.Kmeans(
        zdim,
        k,
        niter=niter,
        nredo=nredo,
        seed=seed,
        max_points_per_centroid=max_points_per_centroid,
        min_points_per_centroid=1,
        gpu=bool(use_gpu),
        verbose=False,
    )
    km.train(x)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    labels = np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk):
        _, idx = km.index.search(x[start : start + chunk], 1)
        labels[start : start + chunk] = idx[:, 0]
    return labels, centroids


def nearest_on_data(z: np.ndarray, points: np.ndarray, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Index of the data point nearest (Euclidean) to each query point.

    z: (N, zdim) data; points: (M, zdim) queries, M small (cluster centres, traversal
    points). Cost O(N M zdim) in (chunk, M) blocks. Returns (M,) int64 indices into z.
    """
    points = np.asarray(points, dtype=np.float64)
    best_dist = np.full(points.shape[0], np.inf)
    best_idx = np.zeros(points.shape[0], dtype=np.int64)
    pts_sq = (points**2).sum(axis=1)
    for start in range(0, z.shape[0], chunk):
        block = z[start : start + chunk].astype(np.float64)
        # squared distances (chunk, M) without forming chunk x M x zdim differences
        d2 = (block**2).sum(axis=1)[:, None] - 2.0 * block @ points.T + pts_sq[None, :]
        arg = d2.argmin(axis=0)
        val = d2[arg, np.arange(points.shape[0])]
        better = val < best_dist
        best_dist[better] = val[better]
        best_idx[better] = arg[better] + start
    return best_idx


def pc_traversal(
    pca: PCA,
    z_pca: np.ndarray,
    pc: int,
    n_points: int = 10,
    lo_percentile: float = 5.0,
    hi_percentile: float = 95.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Points along principal axis ``pc`` (0-based) from its lo to hi percentile.

    The other PC coordinates are 0 (the latent mean). z_pca: (N, >= pc+1) projections.
    Returns (t (n_points,) PC coordinates, z (n_points, zdim) float32).
    """
    if pc >= pca.components.shape[0]:
        raise DistdrgnError(f"PC {pc + 1} requested but zdim is {pca.components.shape[0]}")
    lo, hi = np.percentile(z_pca[:, pc], [lo_percentile, hi_percentile])
    t = np.linspace(lo, hi, n_points)
    z = (pca.mean + t[:, None] * pca.components[pc][None, :]).astype(np.float32)
    return t, z


def umap_embed(
    z: np.ndarray,
    max_fit: int = 50_000,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    n_epochs: int | None = None,
    chunk: int = 100_000,
) -> np.ndarray | None:
    """2-D UMAP embedding of z (N, zdim) -> (N, 2) float32, or None when not meaningful.

    UMAP is fitted on a random subsample of at most ``max_fit`` points (fitting is
    super-linear in memory and time); the remaining points are placed with the fitted
    model's ``transform`` in chunks. Skipped (None, with a log line) when zdim == 1 or
    there are too few points for the neighbour graph.
    """
    n, zdim = z.shape
    if zdim < 2:
        log.info("UMAP skipped: zdim is 1")
        return None
    if n < max(3 * n_neighbors, 30):
        log.info("UMAP skipped: only %d particles", n)
        return None
    import umap  # slow import (numba), only when needed

    rng = np.random.default_rng(seed)
    if n > max_fit:
        fit_idx = np.sort(rng.choice(n, size=max_fit, replace=False))
    else:
        fit_idx = np.arange(n)
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        random_state=seed,
        n_epochs=n_epochs,
        n_jobs=1,  # a fixed random_state makes UMAP single-threaded anyway
    )
    out = np.empty((n, 2), dtype=np.float32)
    out[fit_idx] = reducer.fit_transform(z[fit_idx]).astype(np.float32)
    if fit_idx.size < n:
        rest = np.ones(n, dtype=bool)
        rest[fit_idx] = False
        rest_idx = np.flatnonzero(rest)
        for start in range(0, rest_idx.size, chunk):
            sel = rest_idx[start : start + chunk]
            out[sel] = reducer.transform(z[sel]).astype(np.float32)
    return out
