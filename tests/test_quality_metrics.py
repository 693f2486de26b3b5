"""Metrics of benchmarks/quality.py (distdrgn.analysis.validation): Spearman, PC ordering, FSC summaries."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from distdrgn.analysis.validation import (
    fsc_auc,
    fsc_summary,
    mismatched_partners,
    pc_spearman,
    spearman,
    stratified_indices,
    summarise,
)
from distdrgn.projection import fsc
from distdrgn.simulate import ground_truth_volume


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 200).astype(float)  # many ties
    b = a + rng.normal(0, 2, 200)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(spearman(np.ones(5), np.arange(5)))


def test_pc1_orders_a_latent_line_and_ignores_noise_dims():
    rng = np.random.default_rng(1)
    c = rng.uniform(0, 1, 2000)
    direction = np.array([0.6, -0.8, 0.0, 0.0])
    z = c[:, None] * 5 * direction + rng.normal(0, 0.1, (2000, 4))
    rho, evr = pc_spearman(z, c, 3)
    assert abs(rho[0]) > 0.99
    assert abs(rho[1]) < 0.1
    assert evr[0] > 0.9
    # a latent that encodes c only along a low-variance axis: PC1 does not order c
    z2 = np.column_stack([rng.normal(0, 3, 2000), c * 0.5])
    rho2, _ = pc_spearman(z2, c, 2)
    assert abs(rho2[0]) < 0.1 and abs(rho2[1]) > 0.99


def test_fsc_auc_and_crossing():
    freqs = np.arange(17) / 32
    assert fsc_auc(freqs, np.ones(17)) == pytest.approx(1.0)
    assert fsc_auc(freqs, np.zeros(17)) == pytest.approx(0.0)
    # linear from 1 at 0 to 0 at Nyquist: area 0.25 / 0.5
    assert fsc_auc(freqs, 1 - freqs / 0.5) == pytest.approx(0.5)
    s = fsc_summary(freqs, 1 - freqs / 0.5, apix=2.0, threshold=0.5)
    assert s["crossing_px"] == pytest.approx(0.25)
    assert s["crossing_A"] == pytest.approx(8.0)


def test_fsc_separates_matched_from_mismatched_ground_truth():
    """The per-image FSC is informative on the simulator's volumes: a slightly noisy copy of the
    right state beats the right noise level on the wrong state."""
    D = 32
    rng = np.random.default_rng(2)
    truth = ground_truth_volume(0.1, True, D)
    other = ground_truth_volume(0.9, False, D)
    noisy = truth + rng.normal(0, 0.3 * truth.std(), truth.shape).astype(np.float32)
    auc_match = fsc_auc(*fsc(noisy, truth))
    auc_other = fsc_auc(*fsc(noisy, other))
    assert auc_match > 0.6
    assert auc_match > auc_other + 0.1


def test_stratified_indices_cover_the_range():
    rng = np.random.default_rng(3)
    c = rng.uniform(0, 1, 1000)
    idx = stratified_indices(c, 20)
    assert len(np.unique(idx)) == 20
    assert np.all(np.diff(c[idx]) >= 0)
    assert c[idx[0]] < 0.05 and c[idx[-1]] > 0.95
    assert np.array_equal(np.sort(stratified_indices(c[:10], 50)), np.arange(10))


def test_mismatched_partners_is_a_derangement():
    for n in (2, 3, 10, 200):
        p = mismatched_partners(n, seed=n)
        assert sorted(p.tolist()) == list(range(n))
        assert np.all(p != np.arange(n))
    with pytest.raises(ValueError):
        mismatched_partners(1)


def test_summarise():
    s = summarise([1, 2, 3, 4])
    assert s["mean"] == 2.5 and s["median"] == 2.5 and s["n"] == 4


def test_benchmark_script_parses_options():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = mod.parse_args(["--n", "100", "-D", "16", "--epochs", "2", "--dim", "32", "--layers", "2", "--zdim", "4",
                           "--out", "/tmp/x", "--cryodrgn", "/bin/cryodrgn"])  # fmt: skip
    assert (args.n, args.D, args.epochs, args.dim, args.layers, args.zdim) == (100, 16, 2, 32, 2, 4)
    assert args.cryodrgn == "/bin/cryodrgn"
    table = mod.markdown_table({"systems": {"distdrgn": {"latent": {"pc1_abs_spearman_c": 0.95, "pc_spearman_c": [0.95],
                                                                     "pc_spearman_subunit": [0.1],
                                                                     "explained_variance_ratio": [0.5]}}}})  # fmt: skip
    assert "0.950" in table and "—" in table
