"""Straight-line traversals of latent space between anchor points."""

from __future__ import annotations

import itertools

import numpy as np

from distdrgn.errors import DistdrgnError


def direct_traversal(anchors_z: np.ndarray, n_points: int = 10, loop: bool = False) -> np.ndarray:
    """Evenly spaced points on the straight segments joining consecutive anchors.

    anchors_z: (A, zdim), A >= 2. Each segment gets ``n_points`` points including both
    of its ends; a shared anchor appears once, so the result has (S * (n_points - 1) + 1)
    rows for S segments (S = A - 1, or A with ``loop``, which returns to the first anchor).
    Returns float32 (M, zdim).
    """
    a = np.asarray(anchors_z, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2:
        raise DistdrgnError(f"give at least 2 anchors, got {a.shape[0] if a.ndim == 2 else a.size}")
    if n_points < 2:
        raise DistdrgnError(f"--n must be >= 2 points per segment, got {n_points}")
    if loop:
        a = np.concatenate([a, a[:1]])
    t = np.linspace(0.0, 1.0, n_points)[:-1, None]  # each segment without its end point
    parts = [start + t * (stop - start) for start, stop in itertools.pairwise(a)]
    parts.append(a[-1:])
    return np.concatenate(parts).astype(np.float32)
