"""Latent-space analysis on synthetic latents with known structure."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from distdrgn.analysis import latent
from distdrgn.errors import DistdrgnError, FormatError


def planted_clusters(n=6000, k=5, zdim=6, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, zdim)) * 5.0
    truth = rng.integers(0, k, size=n)
    z = (centres[truth] + spread * rng.normal(size=(n, zdim))).astype(np.float32)
    return z, truth, centres


def test_load_z_reads_first_of_two_pickles(tmp_path):
    mu = np.arange(12, dtype=np.float32).reshape(6, 2)
    path = tmp_path / "z.pkl"
    with open(path, "wb") as f:
        pickle.dump(mu, f)
        pickle.dump(np.full_like(mu, -3.0), f)
    z = latent.load_z(path)
    assert z.dtype == np.float32 and z.shape == (6, 2)
    np.testing.assert_array_equal(z, mu)


def test_load_z_errors_are_one_line(tmp_path):
    with pytest.raises(FormatError, match="not found"):
        latent.load_z(tmp_path / "missing.pkl")
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(FormatError, match="bad.pkl"):
        latent.load_z(bad)
    nan = tmp_path / "nan.pkl"
    with open(nan, "wb") as f:
        pickle.dump(np.array([[0.0, np.nan]], dtype=np.float32), f)
    with pytest.raises(FormatError, match="NaN"):
        latent.load_z(nan)


def test_pca_matches_numpy_svd():
    rng = np.random.default_rng(1)
    # anisotropic, correlated, far from the origin (tests the shifted one-pass sums)
    mixing = rng.normal(size=(5, 5)) * np.array([4.0, 2.0, 1.0, 0.5, 0.1])[:, None]
    z = (rng.normal(size=(5000, 5)) @ mixing + 100.0).astype(np.float32)
    pca = latent.fit_pca(z, chunk=777)  # several chunks, last one partial

    zc = z.astype(np.float64) - z.astype(np.float64).mean(axis=0)
    _, s, vt = np.linalg.svd(zc, full_matrices=False)
    ref_var = s**2 / (z.shape[0] - 1)
    np.testing.assert_allclose(pca.mean, z.astype(np.float64).mean(axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(pca.explained_variance, ref_var, rtol=1e-6)
    for i in range(5):  # same axes up to sign
        assert abs(abs(pca.components[i] @ vt[i]) - 1.0) < 1e-6
    np.testing.assert_allclose(pca.explained_variance_ratio.sum(), 1.0)

    proj = pca.transform(z, n_components=2)
    assert proj.shape == (5000, 2)
    ref_proj = zc @ vt[:2].T
    np.testing.assert_allclose(np.abs(proj), np.abs(ref_proj), rtol=1e-4, atol=1e-3)
    # inverse of the full projection recovers z
    np.testing.assert_allclose(pca.inverse_transform(pca.transform(z)), z, atol=1e-3)


def test_kmeans_recovers_planted_clusters():
    z, truth, centres = planted_clusters()
    labels, found = latent.kmeans(z, 5, seed=3)
    assert labels.shape == (z.shape[0],) and found.shape == (5, z.shape[1])
    # each found cluster is exactly one planted cluster (a bijection)
    pairs = set(zip(labels.tolist(), truth.tolist()))
    assert len(pairs) == 5
    assert sorted({a for a, _ in pairs}) == list(range(5))
    # and the centroids sit on the planted centres
    d = np.linalg.norm(found[:, None, :] - centres[None, :, :], axis=-1)
    assert d.min(axis=1).max() < 0.1


def test_kmeans_is_seeded():
    z, _, _ = planted_clusters(n=3000, k=8, spread=2.0)
    a, ca = latent.kmeans(z, 8, seed=7)
    b, cb = latent.kmeans(z, 8, seed=7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ca, cb)


def test_kmeans_rejects_too_few_points():
    with pytest.raises(DistdrgnError, match="at least 10"):
        latent.kmeans(np.zeros((4, 2), np.float32), 10)


def test_nearest_on_data_is_the_nearest_point():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(2345, 4)).astype(np.float32)
    queries = rng.normal(size=(7, 4))
    idx = latent.nearest_on_data(z, queries, chunk=500)
    brute = np.linalg.norm(z[:, None, :].astype(np.float64) - queries[None], axis=-1).argmin(axis=0)
    np.testing.assert_array_equal(idx, brute)
    # a query equal to a data point finds that point
    assert latent.nearest_on_data(z, z[[1234]])[0] == 1234


def test_pc_traversal_spans_percentiles():
    rng = np.random.default_rng(3)
    z = (rng.normal(size=(4000, 3)) * [3.0, 1.0, 0.2] + [1.0, -2.0, 0.5]).astype(np.float32)
    pca = latent.fit_pca(z)
    z_pca = pca.transform(z)
    for pc in range(2):
        t, zs = latent.pc_traversal(pca, z_pca, pc, n_points=10)
        lo, hi = np.percentile(z_pca[:, pc], [5, 95])
        assert t.shape == (10,) and zs.shape == (10, 3)
        np.testing.assert_allclose([t[0], t[-1]], [lo, hi], rtol=1e-6)
        assert np.all(np.diff(t) > 0)
        # points lie on the PC line through the mean: their PC coordinates are (t, 0, ...)
        coords = pca.transform(zs)
        np.testing.assert_allclose(coords[:, pc], t, atol=1e-4)
        others = np.delete(coords, pc, axis=1)
        np.testing.assert_allclose(others, 0.0, atol=1e-4)
    with pytest.raises(DistdrgnError, match="zdim is 3"):
        latent.pc_traversal(pca, z_pca, 3)


def test_umap_skips_degenerate_inputs():
    assert latent.umap_embed(np.zeros((500, 1), np.float32)) is None
    assert latent.umap_embed(np.zeros((10, 4), np.float32)) is None


def test_umap_fit_on_subsample_then_transform_rest():
    z, truth, _ = planted_clusters(n=600, k=3, zdim=4, spread=0.2, seed=5)
    emb = latent.umap_embed(z, max_fit=300, n_epochs=30, n_neighbors=10)
    assert emb.shape == (600, 2) and np.isfinite(emb).all()
    # planted clusters stay separated in the embedding, including transformed points
    means = np.array([emb[truth == c].mean(axis=0) for c in range(3)])
    spreads = np.array([emb[truth == c].std(axis=0).max() for c in range(3)])
    gaps = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(3, 1)]
    assert gaps.min() > 2 * spreads.max()
