"""The analysis commands as a user runs them, on a short training run of simulated data.

simulate -> ingest (conftest's small_dataset) -> train 2 epochs (zdim 2) -> analyze
(latent part) -> graph-traversal / pc-traversal / direct-traversal -> eval-vol on the
path; select -> store export --ind -> the .star/.cs re-read by our parsers and starfile.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import starfile

from distdrgn import cli
from distdrgn.analysis import latent
from distdrgn.analysis.analyze import analyze
from distdrgn.checkpoint import save_z
from distdrgn.config import load_config
from distdrgn.train import train

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "distdrgn.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def trained(small_dataset, tiny_overrides, tmp_path_factory):
    """A 2-epoch zdim-2 run on the simulated store, plus analyze's latent outputs (k-means labels)."""
    run = tmp_path_factory.mktemp("analysis_run") / "run"
    train(load_config(None, tiny_overrides(small_dataset["store"], run)))
    report = analyze(run, ksample=4, n_pcs=1, umap=False, volumes=False)
    z = latent.load_z(run / "z.pkl")
    return {"run": run, "z": z, "ana": report.parent, "store": small_dataset["store"]}


def test_graph_traversal_cli_writes_path_and_latents(trained, tmp_path):
    z = trained["z"]
    a, b = 0, int(np.argmax(np.linalg.norm(z - z[0], axis=1)))
    out = tmp_path / "gt"
    proc = run_cli("graph-traversal", trained["run"], "--anchors", a, b, "--max-neighbors", 30,
                   "--avg-neighbors", 30, "-o", out)
    assert proc.returncode == 0, proc.stderr
    path = np.loadtxt(out / "path.txt", dtype=np.int64, ndmin=1)
    zpath = np.loadtxt(out / "z.path.txt", ndmin=2)
    assert path[0] == a and path[-1] == b and len(set(path.tolist())) == len(path)
    np.testing.assert_allclose(zpath, z[path], rtol=1e-6, atol=1e-6)
    assert f"path: {len(path)} particles, {len(path) - 1} hops" in proc.stdout
    # the path is ready for eval-vol: a volume per row, at the run's box
    vols = tmp_path / "vols"
    assert cli.main(["eval-vol", str(trained["run"]), "--zfile", str(out / "z.path.txt"), "-o", str(vols),
                     "--device", "cpu"]) == 0
    assert len(list(vols.glob("vol_*.mrc"))) == len(path)


def test_graph_traversal_cli_disconnected_is_one_line_error(tmp_path):
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(size=(100, 3)), rng.normal(size=(100, 3)) + 100]).astype(np.float32)
    zfile = tmp_path / "z.pkl"
    save_z(zfile, z, np.zeros_like(z))
    proc = run_cli("graph-traversal", zfile, "--anchors", 0, 150, "-o", tmp_path / "out")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: particles 0 and 150 are not connected")
    assert "--max-neighbors" in errors[0] and "Traceback" not in proc.stderr
    assert run_cli("graph-traversal", zfile, "--anchors", 0, 500, "-o", tmp_path / "o").returncode == 2


def test_pc_traversal_cli(trained, tmp_path, capsys):
    z = trained["z"]
    out = tmp_path / "pc1.txt"
    assert cli.main(["pc-traversal", str(trained["run"] / "z.pkl"), "--pc", "1", "--n", "7", "-o", str(out)]) == 0
    pts = np.loadtxt(out, ndmin=2)
    pca = latent.fit_pca(z)
    _t, ref = latent.pc_traversal(pca, pca.transform(z), 0, n_points=7)
    np.testing.assert_allclose(pts, ref, rtol=1e-5, atol=1e-5)
    assert "PC1" in capsys.readouterr().out
    # explicit limits: the points' PC1 coordinates are exactly those, the other PCs 0
    assert cli.main(["pc-traversal", str(trained["run"]), "--pc", "2", "--n", "3", "--lim", "-1", "2",
                     "-o", str(out)]) == 0
    coords = pca.transform(np.loadtxt(out, ndmin=2).astype(np.float32))
    np.testing.assert_allclose(coords[:, 1], [-1, 0.5, 2], atol=1e-4)
    np.testing.assert_allclose(coords[:, 0], 0, atol=1e-4)
    assert cli.main(["pc-traversal", str(trained["run"]), "--pc", "3", "-o", str(out)]) == 2


def test_direct_traversal_cli(trained, tmp_path):
    z = trained["z"]
    out = tmp_path / "line.txt"
    assert cli.main(["direct-traversal", str(trained["run"]), "--anchors", "3", "10", "20", "--n", "4",
                     "-o", str(out)]) == 0
    pts = np.loadtxt(out, ndmin=2)
    assert pts.shape == (7, 2)
    np.testing.assert_allclose(pts[[0, 3, 6]], z[[3, 10, 20]], atol=1e-6)
    np.testing.assert_allclose(pts[1], z[3] + (z[10] - z[3]) / 3, atol=1e-5)
    assert cli.main(["direct-traversal", str(trained["run"]), "--anchors", "3", "9999", "-o", str(out)]) == 2


def read_ind(path):
    with open(path, "rb") as f:
        ind = pickle.load(f)
    assert isinstance(ind, np.ndarray) and ind.dtype == np.int64 and (np.diff(ind) > 0).all()
    return ind


def test_select_cli_criteria(trained, tmp_path):
    run, z = trained["run"], trained["z"]
    labels_file = next(trained["ana"].glob("kmeans*/labels.pkl"))
    with open(labels_file, "rb") as f:
        labels = pickle.load(f)
    out = tmp_path / "ind.pkl"
    proc = run_cli("select", run, "--kmeans-labels", labels_file, "--kmeans-select", 0, 2, "-o", out)
    assert proc.returncode == 0, proc.stderr
    ind = read_ind(out)
    np.testing.assert_array_equal(ind, np.flatnonzero(np.isin(labels, [0, 2])))
    assert f"selected {len(ind)} of {len(z)} particles" in proc.stdout
    # combined with a norm cut, and inverted
    median = float(np.median(np.linalg.norm(z, axis=1)))
    assert cli.main(["select", str(run), "--kmeans-labels", str(labels_file), "--kmeans-select", "0", "2",
                     "--z-norm-above", str(median), "--invert", "-o", str(out), "--force"]) == 0
    keep = np.isin(labels, [0, 2]) & (np.linalg.norm(z, axis=1) > median)
    np.testing.assert_array_equal(read_ind(out), np.flatnonzero(~keep))
    # a UMAP polygon, using the embedding in analyze's default directory
    emb = z[:, ::-1] * 2.0  # any (N, 2) embedding: here a known function of z
    np.save(trained["ana"] / "umap.npy", emb)
    poly = tmp_path / "poly.txt"
    lo, hi = np.percentile(emb, 25, axis=0), np.percentile(emb, 75, axis=0)
    poly.write_text(f"{lo[0]} {lo[1]}\n{hi[0]} {lo[1]}\n{hi[0]} {hi[1]}\n{lo[0]} {hi[1]}\n")
    assert cli.main(["select", str(run), "--umap-polygon", str(poly), "-o", str(out), "--force"]) == 0
    inside = (emb[:, 0] > lo[0]) & (emb[:, 0] < hi[0]) & (emb[:, 1] > lo[1]) & (emb[:, 1] < hi[1])
    np.testing.assert_array_equal(read_ind(out), np.flatnonzero(inside))
    # errors: no criterion, existing output, half a k-means option, polygon without embedding
    assert cli.main(["select", str(run), "-o", str(tmp_path / "x.pkl")]) == 2
    assert cli.main(["select", str(run), "--z-norm-above", "0", "-o", str(out)]) == 2
    assert cli.main(["select", str(run), "--kmeans-select", "1", "-o", str(tmp_path / "y.pkl")]) == 2
    assert cli.main(["select", str(run / "z.pkl"), "--umap-polygon", str(poly), "-o", str(tmp_path / "w.pkl")]) == 2


def test_selection_exports_exactly_those_particles(trained, tmp_path):
    from distdrgn.formats.cs import read_cs
    from distdrgn.formats.mrc import open_mrc
    from distdrgn.formats.poses import parse_poses
    from distdrgn.formats.star import read_star
    from distdrgn.store.reader import ParticleStore

    run, z, store_path = trained["run"], trained["z"], trained["store"]
    ind_file = tmp_path / "ind.pkl"
    assert cli.main(["select", str(run), "--pc-range", "1", "-100", str(float(np.median(latent.fit_pca(z).transform(z)[:, 0]))),
                     "-o", str(ind_file)]) == 0
    ind = read_ind(ind_file)
    assert 0 < len(ind) < len(z)
    store = ParticleStore.open(store_path)
    for suffix in ("star", "cs"):
        out = tmp_path / f"subset.{suffix}"
        assert cli.main(["store", "export", str(store_path), "--ind", str(ind_file), "-o", str(out),
                         "--new-stack", "--no-progress"]) == 0
        stack = open_mrc(tmp_path / "subset.mrcs")
        assert stack.n == len(ind)
        np.testing.assert_array_equal(stack.read(slice(None)), store.images(ind))
        rots, trans = parse_poses(out, D=store.D)
        np.testing.assert_allclose(rots, store.poses[0][ind], atol=1e-5)
        np.testing.assert_allclose(trans, store.poses[1][ind], atol=1e-6)
        if suffix == "star":
            ours = read_star(out).particles
            theirs = starfile.read(out, always_dict=True)["particles"]
            assert len(ours) == len(theirs) == len(ind)
            np.testing.assert_allclose(theirs["rlnDefocusU"].to_numpy(), store.ctf[ind, 2], rtol=1e-6)
            assert theirs["rlnImageName"].iloc[-1] == f"{len(ind):06d}@subset.mrcs"
        else:
            arr = read_cs(out)
            assert len(arr) == len(ind)
            np.testing.assert_array_equal(arr["uid"], store.original_index[ind])
        (tmp_path / "subset.mrcs").unlink()


def test_filter_without_display_points_to_select(trained, tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    proc = run_cli("filter", trained["run"], "-o", tmp_path / "ind.pkl", env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no display" in lines[0] and "distdrgn select" in lines[0]
    assert not (tmp_path / "ind.pkl").exists()
