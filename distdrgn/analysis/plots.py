"""Figures of a run's latent space and training curve (matplotlib, Agg backend, PNG).

Each function writes one PNG and returns its path. Point clouds use density (hexbin)
when there are many points; colouring by cluster draws a fixed-size random subsample, so
a plot of 1M+ particles costs the same as one of 50k.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SCATTER_MAX = 20_000  # above this many points, draw density or a subsample
DPI = 110


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _subsample(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def plot_density(
    xy: np.ndarray,
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str,
    marks: np.ndarray | None = None,
    mark_labels: list[str] | None = None,
) -> Path:
    """Density of 2-D points xy (N, 2): hexbin (log counts) for large N, scatter otherwise.

    marks: optional (M, 2) points drawn on top (e.g. cluster centres), labelled with
    ``mark_labels``.
    """
    fig, ax = plt.subplots(figsize=(5.5, 4.6))
    n = xy.shape[0]
    if n > SCATTER_MAX:
        hb = ax.hexbin(xy[:, 0], xy[:, 1], gridsize=80, bins="log", cmap="viridis", mincnt=1)
        fig.colorbar(hb, ax=ax, label="particles (log)")
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=3, alpha=0.4, linewidths=0, color="tab:blue")
    if marks is not None:
        ax.scatter(marks[:, 0], marks[:, 1], s=30, c="k", marker="x")
        for i, (x, y) in enumerate(marks):
            label = mark_labels[i] if mark_labels else str(i)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} ({n:,} particles)")
    return _save(fig, path)


def plot_clusters(
    xy: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    xlabel: str,
    ylabel: str,
    title: str,
    centers: np.ndarray | None = None,
    max_points: int = SCATTER_MAX,
    seed: int = 0,
) -> Path:
    """Points xy (N, 2) coloured by cluster label (N,); draws a random subsample of at most
    ``max_points`` points. centers: optional (K, 2) positions, numbered on the plot."""
    fig, ax = plt.subplots(figsize=(5.5, 4.6))
    sel = _subsample(xy.shape[0], max_points, seed)
    k = int(labels.max()) + 1 if labels.size else 1
    cmap = plt.get_cmap("tab20" if k <= 20 else "nipy_spectral", k)
    ax.scatter(xy[sel, 0], xy[sel, 1], s=3, c=labels[sel], cmap=cmap, vmin=-0.5, vmax=k - 0.5, alpha=0.5, linewidths=0)
    if centers is not None:
        ax.scatter(centers[:, 0], centers[:, 1], s=30, c="k", marker="x")
        for i, (x, y) in enumerate(centers):
            ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    shown = f"{sel.size:,} of {xy.shape[0]:,}" if sel.size < xy.shape[0] else f"{xy.shape[0]:,}"
    ax.set_title(f"{title} ({shown} particles)")
    return _save(fig, path)


def plot_explained_variance(ratio: np.ndarray, path: str | Path) -> Path:
    """Bar chart of the explained variance ratio (zdim,) per PC, with the cumulative sum."""
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    pcs = np.arange(1, ratio.size + 1)
    ax.bar(pcs, ratio, color="tab:blue", label="per PC")
    ax.plot(pcs, np.cumsum(ratio), "o-", color="tab:orange", label="cumulative")
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio")
    ax.set_xticks(pcs)
    ax.set_ylim(0, 1.05)
    ax.legend(loc="center right")
    ax.set_title("PCA of the latent space")
    return _save(fig, path)


def read_loss_csv(path: str | Path) -> dict[str, np.ndarray]:
    """Numeric columns of a run's loss.csv (header row, one row per step or epoch).

    Columns whose values are not all numbers are dropped. Returns {name: (rows,) float64}.
    """
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        return {}
    header, body = rows[0], rows[1:]
    columns: dict[str, np.ndarray] = {}
    for j, name in enumerate(header):
        try:
            columns[name.strip()] = np.array([float(r[j]) for r in body if len(r) > j and r[j] != ""])
        except ValueError:
            continue
    return {k: v for k, v in columns.items() if v.size == len(body)}


# loss.csv columns drawn: names containing one of these (counters, timings and settings are not)
_LOSS_WORDS = ("loss", "mse", "kl", "nll", "err")


def plot_loss(path_csv: str | Path, path: str | Path) -> Path | None:
    """Training curves from loss.csv: every loss-like column against the x column.

    The x axis is ``step`` (or ``iteration``) when present, else ``epoch``, else the row
    number. Returns None when the file has no numeric loss column.
    """
    cols = read_loss_csv(path_csv)
    lower = {k.lower(): k for k in cols}
    x_name = next((lower[c] for c in ("step", "iteration", "iter", "epoch") if c in lower), None)
    losses = [k for k in cols if any(w in k.lower() for w in _LOSS_WORDS)]
    if not losses:
        return None
    n = len(next(iter(cols.values())))
    x = cols[x_name] if x_name else np.arange(n)
    fig, axes = plt.subplots(1, len(losses), figsize=(4.2 * len(losses), 3.4), squeeze=False)
    for ax, name in zip(axes[0], losses):
        y = cols[name]
        ax.plot(x, y, "o-" if y.size <= 30 else "-", lw=1.2, ms=3)
        ax.set_xlabel(x_name or "row")
        ax.set_title(name)
        if np.all(y > 0) and y.max() / max(y.min(), 1e-30) > 50:
            ax.set_yscale("log")
    fig.suptitle("training loss")
    fig.tight_layout()
    return _save(fig, path)


def plot_projections(images: list[np.ndarray], titles: list[str], path: str | Path, ncols: int = 10) -> Path:
    """Montage of volume projections, each (D, D) (a volume summed along z)."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.4 * ncols, 1.55 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, title in zip(axes.ravel(), images, titles):
        ax.imshow(np.asarray(image), cmap="gray", origin="lower")
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_histogram(values: np.ndarray, path: str | Path, xlabel: str, title: str, marks: np.ndarray | None = None) -> Path:
    """Histogram of a 1-D latent (N,) (zdim = 1); marks: optional positions drawn as lines."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.hist(values, bins=100, color="tab:blue")
    if marks is not None:
        for i, x in enumerate(np.atleast_1d(marks)):
            ax.axvline(x, color="k", lw=0.8)
            ax.annotate(str(i), (x, ax.get_ylim()[1]), fontsize=7, ha="center", va="top")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("particles")
    ax.set_title(f"{title} ({values.size:,} particles)")
    return _save(fig, path)
