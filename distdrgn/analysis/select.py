"""Particle selection in latent space: boolean masks from criteria, combined into an index array.

Each criterion gives an (N,) boolean mask over the particles (rows of z, which are the
store positions the run was trained on); :func:`selection_indices` intersects them and
returns the sorted positions that ``--ind`` options (``train``, ``store export``,
``backproject``) read as ``ind.pkl``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from distdrgn.errors import DistdrgnError, FormatError


def load_polygon(path: str | Path) -> np.ndarray:
    """Polygon vertices (M, 2) float64 from a JSON or text file.

    JSON: a list of [x, y] pairs, or an object with a "vertices" list of them. Text: one
    vertex per line, x and y separated by whitespace or a comma. At least 3 vertices; the
    polygon is closed implicitly.
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such polygon file")
    text = path.read_text()
    try:
        if text.lstrip().startswith(("[", "{")):
            data = json.loads(text)
            if isinstance(data, dict):
                data = data.get("vertices")
            verts = np.asarray(data, dtype=np.float64)
        else:
            verts = np.loadtxt(path, delimiter=None if "," not in text else ",", ndmin=2, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise FormatError(f"{path}: cannot read polygon vertices ({str(exc).splitlines()[0]})") from None
    if verts.ndim != 2 or verts.shape[1] != 2 or verts.shape[0] < 3:
        raise FormatError(f"{path}: expected at least 3 vertices of 2 coordinates, got shape {verts.shape}")
    if not np.isfinite(verts).all():
        raise FormatError(f"{path}: polygon vertices must be finite numbers")
    return verts


def save_polygon(path: str | Path, vertices: np.ndarray) -> None:
    """Write polygon vertices (M, 2) as JSON ``{"vertices": [[x, y], ...]}`` (read by :func:`load_polygon`)."""
    Path(path).write_text(json.dumps({"vertices": np.asarray(vertices, dtype=float).tolist()}) + "\n")


def points_in_polygon(xy: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Which points (N, 2) lie inside the closed polygon ``vertices`` (M, 2) -> (N,) bool."""
    from matplotlib.path import Path as MplPath

    poly = MplPath(np.asarray(vertices, dtype=np.float64), closed=False)
    return poly.contains_points(np.asarray(xy, dtype=np.float64))


def mask_labels(labels: np.ndarray, keep) -> np.ndarray:
    """Particles whose cluster label is one of ``keep`` -> (N,) bool."""
    labels = np.asarray(labels).reshape(-1)
    keep = np.asarray(list(keep), dtype=np.int64)
    missing = np.setdiff1d(keep, labels)
    if missing.size:
        raise DistdrgnError(f"cluster label(s) {missing.tolist()} do not occur in the labels (0..{labels.max()})")
    return np.isin(labels, keep)


def mask_z_norm(z: np.ndarray, above: float | None = None, below: float | None = None) -> np.ndarray:
    """Particles with ``above < |z| < below`` (either bound optional) -> (N,) bool."""
    norm = np.linalg.norm(np.asarray(z, dtype=np.float64), axis=1)
    mask = np.ones(norm.shape[0], dtype=bool)
    if above is not None:
        mask &= norm > above
    if below is not None:
        mask &= norm < below
    return mask


def mask_pc_range(z: np.ndarray, pc: int, lo: float, hi: float) -> np.ndarray:
    """Particles whose coordinate on principal component ``pc`` (1-based) is in [lo, hi] -> (N,) bool."""
    from distdrgn.analysis.latent import fit_pca

    zdim = z.shape[1]
    if not 1 <= pc <= zdim:
        raise DistdrgnError(f"--pc-range: PCs are numbered 1..{zdim} (zdim {zdim}), got {pc}")
    coord = fit_pca(z).transform(z, pc)[:, pc - 1]
    return (coord >= lo) & (coord <= hi)


def load_labels(path: str | Path, n: int) -> np.ndarray:
    """Cluster labels (N,) from a pickle (``kmeansK/labels.pkl`` of ``distdrgn analyze``) or a text file."""
    from distdrgn.formats.ind import read_pickle, read_text_array

    path = Path(path)
    if path.suffix == ".pkl":
        labels = np.asarray(read_pickle(path, "cluster labels"))
    else:
        labels = read_text_array(path, "labels", np.int64, ndmin=1)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise FormatError(f"{path}: expected a 1-D integer array of labels, got shape {labels.shape} {labels.dtype}")
    if labels.shape[0] != n:
        raise FormatError(f"{path}: {labels.shape[0]} labels but {n} particles")
    return labels.astype(np.int64)


def load_embedding(path: str | Path, n: int) -> np.ndarray:
    """A 2-D embedding (N, 2) from a .npy (``umap.npy`` of ``distdrgn analyze``)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such embedding file (run 'distdrgn analyze' with UMAP, or give --umap)")
    try:
        emb = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise FormatError(f"{path}: not a .npy array ({exc})") from None
    if emb.ndim != 2 or emb.shape[1] != 2 or emb.shape[0] != n:
        raise FormatError(f"{path}: expected an embedding of shape ({n}, 2), got {emb.shape}")
    return emb


def selection_indices(masks: list[np.ndarray], n: int, invert: bool = False) -> np.ndarray:
    """Sorted int64 positions of the particles selected by every mask (all N when no mask).

    ``invert`` returns the complement of that intersection.
    """
    sel = np.ones(n, dtype=bool)
    for m in masks:
        m = np.asarray(m, dtype=bool)
        if m.shape != (n,):
            raise ValueError(f"mask of shape {m.shape} for {n} particles")
        sel &= m
    if invert:
        sel = ~sel
    return np.flatnonzero(sel).astype(np.int64)
