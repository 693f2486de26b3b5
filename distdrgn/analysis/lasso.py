"""Interactive lasso selection of particles on a 2-D embedding (``distdrgn filter``).

The selection logic (:class:`LassoSession`: a lasso path -> selected positions -> IND.pkl)
works on any matplotlib figure, so it runs and is tested headless; only
:func:`run_lasso` needs a display.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from distdrgn.analysis.select import points_in_polygon, save_polygon, selection_indices
from distdrgn.errors import DistdrgnError
from distdrgn.formats.ind import save_indices

MAX_DRAWN = 200_000  # points drawn in the scatter; the selection always covers all of them

NON_GUI_BACKENDS = {"agg", "pdf", "ps", "svg", "pgf", "cairo", "template", "module://matplotlib_inline.backend_inline"}


def display_available() -> bool:
    """Whether an interactive matplotlib window can be opened here.

    Needs a display server on Linux (DISPLAY or WAYLAND_DISPLAY) and a backend that is
    not forced to a file-only one through MPLBACKEND.
    """
    forced = os.environ.get("MPLBACKEND", "").lower()
    if forced in NON_GUI_BACKENDS:
        return False
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    return True


class LassoSession:
    """State of one lasso selection on points ``xy`` (N, 2).

    ``select(vertices)`` replaces the selection by the points inside the lasso path
    (``add=True`` adds to it); ``save()`` writes the sorted positions to ``out`` (and the
    last lasso path to ``polygon_out`` as JSON, reusable with ``distdrgn select
    --umap-polygon``).
    """

    def __init__(self, xy: np.ndarray, out: str | Path, polygon_out: str | Path | None = None):
        self.xy = np.asarray(xy, dtype=np.float64)
        self.out = Path(out)
        self.polygon_out = None if polygon_out is None else Path(polygon_out)
        self.selected = np.zeros(len(self.xy), dtype=bool)
        self.vertices: np.ndarray | None = None

    def select(self, vertices, add: bool = False) -> int:
        verts = np.asarray(vertices, dtype=np.float64)
        if verts.ndim != 2 or verts.shape[0] < 3:
            return int(self.selected.sum())  # a click, not a lasso
        inside = points_in_polygon(self.xy, verts)
        self.selected = (self.selected | inside) if add else inside
        self.vertices = verts
        return int(self.selected.sum())

    def indices(self, invert: bool = False) -> np.ndarray:
        return selection_indices([self.selected], len(self.xy), invert=invert)

    def save(self, invert: bool = False) -> np.ndarray:
        ind = self.indices(invert)
        if ind.size == 0:
            raise DistdrgnError("nothing selected: draw a lasso around some particles first")
        save_indices(self.out, ind)
        if self.polygon_out is not None and self.vertices is not None:
            save_polygon(self.polygon_out, self.vertices)
        return ind


def run_lasso(session: LassoSession, labels: np.ndarray | None, xlabel: str, ylabel: str, seed: int = 0) -> int:
    """Open the window; blocks until it is closed. Returns the number of particles saved (0 if none).

    Keys: drag = lasso (shift: add to the selection), ``s`` = save, ``i`` = save the
    complement, ``q`` = close.
    """
    if not display_available():
        raise DistdrgnError("no display for the interactive lasso; select non-interactively with "
                            "'distdrgn select --umap-polygon FILE' (or --kmeans-select, --pc-range, --z-norm-above)")
    import matplotlib.pyplot as plt
    from matplotlib.widgets import LassoSelector

    xy = session.xy
    n = len(xy)
    shown = np.arange(n)
    if n > MAX_DRAWN:
        shown = np.sort(np.random.default_rng(seed).choice(n, MAX_DRAWN, replace=False))
    fig, ax = plt.subplots(figsize=(8, 7))
    colors = labels[shown] if labels is not None else None
    ax.scatter(xy[shown, 0], xy[shown, 1], s=2, c=colors, cmap="tab20" if labels is not None else None, alpha=0.5)
    highlight = ax.scatter([], [], s=3, c="red")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    title = "drag: lasso (shift: add)   s: save   i: save complement   q: close"
    ax.set_title(title, fontsize=9)
    saved = {"count": 0}
    state = {"add": False}

    def on_select(verts):
        count = session.select(verts, add=state["add"])
        pts = xy[shown][session.selected[shown]]
        highlight.set_offsets(pts if len(pts) else np.empty((0, 2)))
        ax.set_title(f"{count} of {n} selected ({100 * count / n:.1f}%)   s: save   i: complement   q: close",
                     fontsize=9)
        fig.canvas.draw_idle()

    def on_key(event):
        if event.key in ("s", "i"):
            try:
                ind = session.save(invert=event.key == "i")
            except DistdrgnError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return
            saved["count"] = ind.size
            print(f"saved {ind.size} of {n} particles to {session.out}", flush=True)
        elif event.key == "shift":
            state["add"] = True

    def on_key_release(event):
        if event.key == "shift":
            state["add"] = False

    lasso = LassoSelector(ax, on_select)  # noqa: F841 (kept alive while the window is open)
    fig.canvas.mpl_connect("key_press_event", on_key)
    fig.canvas.mpl_connect("key_release_event", on_key_release)
    plt.show()
    return saved["count"]
