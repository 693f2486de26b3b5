"""Selection masks, polygon files and the lasso session (headless)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from distdrgn.analysis import lasso
from distdrgn.analysis import select as S
from distdrgn.errors import DistdrgnError, FormatError

SQUARE = [[0, 0], [2, 0], [2, 2], [0, 2]]


def grid_points():
    g = np.arange(-1.5, 4.0, 1.0)  # -1.5 .. 3.5: 6 x 6 points, 4 of them inside (0, 2)^2
    xx, yy = np.meshgrid(g, g)
    return np.column_stack([xx.ravel(), yy.ravel()])


@pytest.mark.parametrize("form", ["json-list", "json-dict", "txt", "csv"])
def test_load_polygon_formats(tmp_path, form):
    path = tmp_path / ("poly.json" if form.startswith("json") else "poly.txt")
    if form == "json-list":
        path.write_text(json.dumps(SQUARE))
    elif form == "json-dict":
        S.save_polygon(path, np.array(SQUARE))
    elif form == "txt":
        path.write_text("\n".join(f"{x} {y}" for x, y in SQUARE) + "\n")
    else:
        path.write_text("\n".join(f"{x},{y}" for x, y in SQUARE) + "\n")
    np.testing.assert_array_equal(S.load_polygon(path), np.array(SQUARE, dtype=float))


def test_load_polygon_errors(tmp_path):
    with pytest.raises(FormatError, match="no such polygon"):
        S.load_polygon(tmp_path / "none.json")
    bad = tmp_path / "two.json"
    bad.write_text("[[0, 0], [1, 1]]")
    with pytest.raises(FormatError, match="at least 3 vertices"):
        S.load_polygon(bad)
    junk = tmp_path / "junk.txt"
    junk.write_text("a b\nc d\n")
    with pytest.raises(FormatError, match="junk.txt"):
        S.load_polygon(junk)


def test_points_in_polygon_and_combination():
    xy = grid_points()
    inside = S.points_in_polygon(xy, np.array(SQUARE))
    assert inside.sum() == 4
    assert set(map(tuple, xy[inside])) == {(0.5, 0.5), (1.5, 0.5), (0.5, 1.5), (1.5, 1.5)}
    z = np.column_stack([xy, np.zeros(len(xy))])
    far = S.mask_z_norm(z, above=2.0)
    near = S.mask_z_norm(z, below=2.0)
    assert (far ^ near).all()  # no point at exactly 2
    both = S.selection_indices([inside, near], len(xy))
    np.testing.assert_array_equal(both, np.flatnonzero(inside & near))
    assert both.dtype == np.int64 and (np.diff(both) > 0).all()
    rest = S.selection_indices([inside, near], len(xy), invert=True)
    assert len(rest) + len(both) == len(xy) and not set(rest) & set(both)
    np.testing.assert_array_equal(S.selection_indices([], 5), np.arange(5))


def test_labels_and_pc_range(tmp_path):
    labels = np.array([0, 1, 2, 1, 0, 2, 2])
    np.testing.assert_array_equal(np.flatnonzero(S.mask_labels(labels, [2, 0])), [0, 2, 4, 5, 6])
    with pytest.raises(DistdrgnError, match=r"\[7\] do not occur"):
        S.mask_labels(labels, [7])
    path = tmp_path / "labels.pkl"
    with open(path, "wb") as f:
        pickle.dump(labels, f)
    np.testing.assert_array_equal(S.load_labels(path, 7), labels)
    with pytest.raises(FormatError, match="7 labels but 8 particles"):
        S.load_labels(path, 8)
    # PC1 of points spread along x: the range picks by x
    rng = np.random.default_rng(0)
    z = np.column_stack([np.linspace(-10, 10, 201), 0.01 * rng.normal(size=201)])
    sel = S.mask_pc_range(z, 1, -1.0, 1.0)
    assert sel.sum() == pytest.approx(21, abs=1)
    assert np.abs(z[sel, 0]).max() <= 1.1
    with pytest.raises(DistdrgnError, match="numbered 1..2"):
        S.mask_pc_range(z, 3, 0, 1)


def test_embedding_shape_is_checked(tmp_path):
    path = tmp_path / "umap.npy"
    np.save(path, np.zeros((10, 3)))
    with pytest.raises(FormatError, match=r"expected an embedding of shape \(10, 2\)"):
        S.load_embedding(path, 10)


def test_lasso_session_selects_and_saves(tmp_path):
    xy = grid_points()
    session = lasso.LassoSession(xy, tmp_path / "ind.pkl", tmp_path / "poly.json")
    with pytest.raises(DistdrgnError, match="nothing selected"):
        session.save()
    assert session.select(np.array(SQUARE)) == 4
    assert session.select([[0, 0], [1, 1]]) == 4  # a click is not a lasso: selection unchanged
    shifted = np.array(SQUARE) + [2.0, 0.0]
    assert session.select(shifted, add=True) == 8
    ind = session.save()
    with open(tmp_path / "ind.pkl", "rb") as f:
        saved = pickle.load(f)
    np.testing.assert_array_equal(saved, ind)
    assert saved.dtype == np.int64
    np.testing.assert_array_equal(saved, np.flatnonzero(S.points_in_polygon(xy, SQUARE)
                                                        | S.points_in_polygon(xy, shifted)))
    np.testing.assert_array_equal(S.load_polygon(tmp_path / "poly.json"), shifted)
    comp = session.save(invert=True)
    assert len(comp) == len(xy) - len(ind)


def test_no_display_is_detected(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(lasso.sys, "platform", "linux")
    assert not lasso.display_available()
    monkeypatch.setenv("DISPLAY", ":0")
    assert lasso.display_available()
    monkeypatch.setenv("MPLBACKEND", "Agg")
    assert not lasso.display_available()
    with pytest.raises(DistdrgnError, match="distdrgn select --umap-polygon"):
        lasso.run_lasso(lasso.LassoSession(grid_points(), "unused.pkl"), None, "x", "y")


def test_lasso_window_builds_headless(monkeypatch, tmp_path):
    # the window code itself (scatter, lasso widget, key bindings) on the Agg backend,
    # where show() returns at once: nothing is saved without a key press
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(lasso, "display_available", lambda: True)
    session = lasso.LassoSession(grid_points(), tmp_path / "ind.pkl")
    assert lasso.run_lasso(session, np.arange(len(session.xy)) % 3, "UMAP1", "UMAP2") == 0
    fig = plt.gcf()
    assert fig.axes[0].get_xlabel() == "UMAP1" and len(fig.axes[0].collections) == 2
    assert not (tmp_path / "ind.pkl").exists()
    plt.close("all")
