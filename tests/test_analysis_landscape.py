"""``distdrgn analyze-landscape`` (:mod:`distdrgn.analysis.landscape`): batched decoding, mask,
PCA and clustering of volume space, end to end on a distdrgn run and a real cryoDRGN 4.3.1 run."""

from __future__ import annotations

import json
import os
import pickle

import mrcfile
import numpy as np
import pytest

from distdrgn import cli, volumes
from distdrgn.analysis import landscape as L
from distdrgn.volume_ops import soft_mask
from fixture_files import CRYODRGN_RUNS, needs_fixtures
from test_analyze import make_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("land") / "run", zdim=3, n=300)


def test_batched_decoding_equals_eval_volume(run_dir):
    trained = volumes.load_model(run_dir, device="cpu")
    zs = np.random.default_rng(1).normal(size=(3, 3)).astype(np.float32)
    got = L.decode_batch(trained, zs)
    for i in range(3):
        np.testing.assert_allclose(got[i], volumes.eval_volume(trained, zs[i]), rtol=1e-4, atol=1e-5)
    got8 = L.decode_batch(trained, zs[:1], D=8)
    np.testing.assert_allclose(got8[0], volumes.eval_volume(trained, zs[0], D=8), rtol=1e-4, atol=1e-5)


def test_clustering_recovers_separated_groups_numbered_by_size():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    sizes = [5, 20, 10]
    x = np.concatenate([c + 0.1 * rng.normal(size=(s, 2)) for c, s in zip(centres, sizes)])
    labels = L.cluster_volumes(x, 3)
    truth = np.repeat([0, 1, 2], sizes)
    for t in range(3):  # every true group is one cluster
        assert len(np.unique(labels[truth == t])) == 1
    # numbered by decreasing size: the 20-point group is 0, the 10-point 1, the 5-point 2
    assert labels[truth == 1][0] == 0 and labels[truth == 2][0] == 1 and labels[truth == 0][0] == 2
    with pytest.raises(Exception, match="n-clusters"):
        L.cluster_volumes(x, 100)


def test_masked_pca_separates_two_kinds_of_volume():
    rng = np.random.default_rng(0)
    D = 12
    base = np.zeros((D, D, D), np.float32)
    base[4:8, 4:8, 4:8] = 1.0
    vols = np.stack([base + (i % 2) * np.roll(base, 2, axis=0) + 0.01 * rng.normal(size=base.shape) for i in range(10)])
    mean = L.mean_volume(vols)
    np.testing.assert_allclose(mean, vols.mean(0), rtol=1e-5, atol=1e-6)
    mask = L.landscape_mask(mean, None, dilate=1.0, dist=1.0, apix=1.0)
    np.testing.assert_array_equal(mask, soft_mask(mean, None, dilate=1.0, dist=1.0, apix=1.0))
    x = L.masked_matrix(vols, mask)
    assert x.shape == (10, int((mask > 0).sum()))
    pca = L.volume_pca(x, 5)
    assert pca.explained_variance_ratio[0] > 0.9  # the two kinds differ along one direction
    labels = L.cluster_volumes(pca.coords, 2)
    np.testing.assert_array_equal(labels[::2], labels[0])
    np.testing.assert_array_equal(labels[1::2], 1 - labels[0])
    means = L.cluster_means(vols, labels, 2)
    np.testing.assert_allclose(means[labels[0]], vols[::2].mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(L.particle_labels(np.array([1, 0, 1]), np.array([7, 9])), [9, 7, 9])


def test_analyze_landscape_on_a_distdrgn_run(run_dir, tmp_path):
    from distdrgn.analysis.report import Section, write_report

    out = tmp_path / "land"
    # an earlier `distdrgn analyze` of the epoch (its report's form, without running the analysis)
    epoch = volumes.load_model(run_dir, device="cpu").epoch
    (run_dir / f"analyze.{epoch}").mkdir()
    write_report(run_dir / f"analyze.{epoch}" / "report.html", "distdrgn analyze", {"epoch": epoch},
                 [Section("Latent space", text="PCA")])
    rc = cli.main(["analyze-landscape", str(run_dir), "-M", "20", "--n-clusters", "3", "--pc-dim", "5",
                   "--dilate", "3.5", "--dist", "3.5", "--device", "cpu", "-o", str(out)])
    assert rc == 0
    vols = np.load(out / "volumes.npy")
    assert vols.shape == (20, 16, 16, 16)
    with open(out / "kmeans20" / "labels.pkl", "rb") as f:
        sk = pickle.load(f)
    centers_ind = np.loadtxt(out / "kmeans20" / "centers_ind.txt", dtype=np.int64)
    trained = volumes.load_model(run_dir, device="cpu")
    z = pickle.load(open(run_dir / "z.pkl", "rb"))
    z = z[0] if isinstance(z, tuple) else z
    np.testing.assert_allclose(vols[3], volumes.eval_volume(trained, z[centers_ind[3]]), rtol=1e-4, atol=1e-5)
    vol_labels = np.loadtxt(out / "volume_labels.txt", dtype=np.int64)
    z_labels = np.load(out / "z_labels.npy")
    assert z_labels.shape == (300,) and set(np.unique(vol_labels)) == {0, 1, 2}
    np.testing.assert_array_equal(z_labels, vol_labels[sk])
    with mrcfile.open(out / "cluster_01_mean.mrc") as m:
        np.testing.assert_allclose(m.data, vols[vol_labels == 1].mean(0), rtol=1e-4, atol=1e-5)
        assert abs(float(m.voxel_size.x) - 3.5) < 1e-4
    meta = json.loads((out / "landscape.json").read_text())
    assert meta["parameters"]["M"] == 20 and sum(meta["particles_per_cluster"]) == 300
    html = (out / "report.html").read_text()
    for name in ("volume_pca.png", "z_landscape.png", "cluster_means.png", "cluster_02_mean.mrc"):
        assert name in html
    # a page of the epoch's analysis report: added once, replaced when run again
    epoch = meta["parameters"]["epoch"]
    analyze_report = run_dir / f"analyze.{epoch}" / "report.html"
    assert analyze_report.is_file()
    assert html_count(analyze_report, 'id="landscape"') == 1
    page = analyze_report.read_text()
    assert "Volume landscape (analyze-landscape, M = 20)" in page and 'data-file="volume_pca.png"' in page
    assert f'href="{os.path.relpath(out / "report.html", analyze_report.parent)}"' in page
    rc = cli.main(["analyze-landscape", str(run_dir), "-M", "20", "--n-clusters", "3", "--pc-dim", "5",
                   "--dilate", "3.5", "--dist", "3.5", "--device", "cpu", "-o", str(tmp_path / "again")])
    assert rc == 0 and html_count(analyze_report, 'id="landscape"') == 1
    assert page.split("<!-- page:landscape -->")[0] == analyze_report.read_text().split("<!-- page:landscape -->")[0]
    # the dashboard finds the landscape labels next to the run
    from distdrgn.dashboard.data import load_run

    (run_dir / f"landscape.{meta['parameters']['epoch']}").symlink_to(out)
    data = load_run(run_dir)
    np.testing.assert_array_equal(data.columns["landscape cluster"], z_labels)


def html_count(path, needle: str) -> int:
    return path.read_text().count(needle)


def test_bad_arguments_are_one_line_errors(run_dir, tmp_path, capsys):
    assert cli.main(["analyze-landscape", str(run_dir), "-M", "4", "--n-clusters", "5", "-o", str(tmp_path / "a")]) == 2
    assert "n-clusters" in capsys.readouterr().err
    assert cli.main(["analyze-landscape", str(run_dir), "-M", "1", "-o", str(tmp_path / "b")]) == 2
    assert "-M must be >= 2" in capsys.readouterr().err


@needs_fixtures
def test_analyze_landscape_on_a_cryodrgn_run(tmp_path):
    out = tmp_path / "land"
    # box 16 instead of the run's 64 keeps the test short; the decoder is the cryoDRGN run's
    L.analyze_landscape(CRYODRGN_RUNS / "vae", m=6, vol_D=16, n_clusters=2, pc_dim=3, device="cpu", out=out)
    vols = np.load(out / "volumes.npy")
    assert vols.shape == (6, 16, 16, 16)
    trained = volumes.load_model(CRYODRGN_RUNS / "vae", device="cpu")
    z = pickle.load(open(CRYODRGN_RUNS / "vae" / "z.pkl", "rb"))
    z = z[0] if isinstance(z, tuple) else z
    ind = np.loadtxt(out / "kmeans6" / "centers_ind.txt", dtype=np.int64)
    np.testing.assert_allclose(vols[0], volumes.eval_volume(trained, z[ind[0]], D=16), rtol=1e-4, atol=1e-5)
    assert np.load(out / "z_labels.npy").shape == (100,)
