"""benchmarks/loader_throughput.py and benchmarks/knn.py run end to end on tiny sizes, as files."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], check=False, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def load_script(name: str):
    """A benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loader_throughput_end_to_end(tmp_path):
    out = tmp_path / "loader.json"
    root = tmp_path / "stores"
    proc = run_script("loader_throughput.py", "--D", "32", "--n", "512", "--workers", "0", "1",
                      "--root", str(root), "--json", str(out))
    saved = json.loads(out.read_text())
    rows = saved["results"]
    # 2 dtypes x 2 worker counts x (cold, warm)
    assert len(rows) == 8
    assert {(r["dtype"], r["workers"], r["cache"].split()[0]) for r in rows} == {
        (dt, w, c) for dt in ("float32", "float16") for w in (0, 1) for c in ("cold", "warm")}
    for r in rows:
        assert r["D"] == 32 and r["n"] == 512 and r["batch_size"] == 64
        assert r["images"] == 512 and r["steps"] == 8  # the whole epoch, world size 1
        assert r["images_read"] == 512  # every image read once
        assert r["images_per_s"] > 0 and r["mb_per_s"] > 0 and r["seconds"] > 0
        assert r["meets_2x_target"] is None and r["gpu_target_images_per_s"] is None  # no target at D=32
    # MB/s counts the stored bytes: float16 stores read half the bytes per image
    for r in rows:
        per_image = r["mb_per_s"] * 1e6 / r["images_per_s"]
        assert per_image == pytest.approx(32 * 32 * (2 if r["dtype"] == "float16" else 4), rel=0.05)
    for r in rows:  # the cold drop worked (ext4 under /tmp); a failed drop must be labelled as such
        if r["cache"] == "cold" and r["resident_before"] is not None:
            assert r["resident_before"] < 0.5
        if r["cache"] == "warm" and r["resident_before"] is not None:
            assert r["resident_before"] > 0.5
    meta = saved["meta"]
    assert meta["cores"] >= 1 and meta["cpu"] and meta["date"] and "type" in meta["filesystem"]
    assert "| ≥2x target |" in proc.stdout and "| 32 | float16 | 512 | 1 |" in proc.stdout
    assert not any(root.iterdir())  # stores deleted without --keep


def test_loader_throughput_one_rank_of_two_and_targets(tmp_path):
    """Rank 1 of 2 trains on half the images; at D=128 the row is judged against 2 x 4,100."""
    out = tmp_path / "loader.json"
    run_script("loader_throughput.py", "--D", "128", "--n", "256", "--dtype", "float16", "--workers", "0",
               "--cache", "warm", "--world-size", "2", "--rank", "1", "--root", str(tmp_path), "--json", str(out))
    (r,) = json.loads(out.read_text())["results"]
    assert r["cache"] == "warm" and r["world_size"] == 2 and r["rank"] == 1
    assert r["images"] == 128
    assert r["gpu_target_images_per_s"] == 4100 and r["required_images_per_s"] == 8200
    assert r["meets_2x_target"] == (r["images_per_s"] >= 8200)


def test_loader_page_cache_drop(tmp_path):
    lt = load_script("loader_throughput")
    data = tmp_path / "store"
    data.mkdir()
    (data / "a.bin").write_bytes(np.random.default_rng(0).bytes(1 << 20))
    (data / "a.bin").read_bytes()
    before = lt.resident_fraction(data)
    if before is None or before < 0.5:
        pytest.skip("mincore not available or the file system does not keep written pages cached")
    lt.drop_page_cache(data)
    after = lt.resident_fraction(data)
    if after > 0.5:
        pytest.skip(f"{lt.filesystem_of(data).get('type')}: pages cannot be dropped with posix_fadvise here")
    assert after < 0.1


def test_knn_end_to_end(tmp_path):
    out = tmp_path / "knn.json"
    proc = run_script("knn.py", "--n", "1500", "3000", "--flat-max", "2000", "--json", str(out))
    rows = {(r["backend"], r["n"]): r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {(b, n) for b in ("kdtree", "faiss-flat", "faiss-ivf", "faiss-gpu", "torch-cuda")
                         for n in (1500, 3000)}
    for n in (1500, 3000):
        r = rows["kdtree", n]
        assert r["points_per_s"] > 0 and r["seconds"] > 0
        assert r["recall_at_10"] == 1.0 and r["recall_queries"] == min(2000, n)
    assert "flat-max" in rows["faiss-flat", 3000]["skipped"]
    faiss_rows = [rows["faiss-flat", 1500], rows["faiss-ivf", 1500], rows["faiss-ivf", 3000]]
    if "skipped" in faiss_rows[0]:
        assert "faiss" in faiss_rows[0]["skipped"]
    else:
        # exact, but faiss' float32 |q|^2 - 2 q.x + |x|^2 can swap near-ties at the k-th neighbour
        assert rows["faiss-flat", 1500]["recall_at_10"] >= 0.99
        for r in faiss_rows[1:]:
            assert r["points_per_s"] > 0 and 0.5 < r["recall_at_10"] <= 1.0
    for n in (1500, 3000):  # the GPU backends run or say why not
        for b in ("faiss-gpu", "torch-cuda"):
            r = rows[b, n]
            assert r.get("skipped") or r["recall_at_10"] >= 0.99
    assert "| kdtree | 3,000 | 8 |" in proc.stdout


def test_knn_recall_counts_missed_neighbours():
    bench_knn = load_script("knn")
    exact = np.array([[1, 2, 3, 4], [0, 2, 3, 4]])
    found = np.array([[4, 3, 2, 1], [0, 2, 9, 8]])
    assert bench_knn.recall_at_k(found, exact) == pytest.approx(6 / 8)
    z = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32)
    q = np.array([0, 5, 7])
    ref = np.argsort(((z[q, None] - z[None]) ** 2).sum(-1), axis=1)[:, 1:6]
    np.testing.assert_array_equal(np.sort(bench_knn.exact_neighbours(z, q, 5), 1), np.sort(ref, 1))


def test_hinge_errors_count_the_mirror_pose_of_a_mirror_symmetric_particle_as_found():
    """benchmarks/abinit.py's hinge rows: F R F images a volume symmetric through z = 0 exactly as
    R does (the reason those poses count as found), and the helper scores them so."""
    import torch

    from distdrgn.atoms import render_volume
    from distdrgn.pose_error import FLIP
    from distdrgn.projection import project_volume
    from distdrgn.so3_grid import so3_exp

    rng = np.random.default_rng(0)
    D = 16
    # a particle of Gaussian atoms, and the same with every atom mirrored through z = 0 added
    atoms = torch.from_numpy(rng.uniform(-0.3 * D, 0.3 * D, size=(40, 3)))
    weights = torch.ones(40, dtype=torch.float64)
    asymmetric = render_volume(atoms, weights, 1.5, D).numpy()
    symmetric = render_volume(torch.cat([atoms, atoms * torch.tensor([1.0, 1.0, -1.0])]), weights.repeat(2), 1.5,
                              D).numpy()
    rots = so3_exp(torch.from_numpy(rng.normal(size=(6, 3)))).float()
    mirrored = (FLIP @ rots.double() @ FLIP).float()
    relative = {}
    for name, vol in (("symmetric", symmetric), ("asymmetric", asymmetric)):
        a, b = project_volume(vol, rots), project_volume(vol, mirrored)
        relative[name] = float((a - b).abs().max() / a.abs().max())
    assert relative["symmetric"] < 1e-3 and relative["asymmetric"] > 0.05, relative  # float32 interpolation

    abinit = load_script("abinit")
    n = 200
    true = so3_exp(torch.from_numpy(rng.normal(size=(n, 3)) * 2)).double()
    subunit = np.arange(n) % 2 == 0
    found = torch.where(torch.from_numpy(subunit)[:, None, None], true, FLIP @ true @ FLIP)
    errs = abinit.hinge_errors_by_subunit(found.numpy(), true.numpy(), subunit)
    assert errs["with_subunit"]["median"] < 1e-6
    assert errs["without_subunit"]["median"] > 30  # F R F is far from R for most R
    assert errs["without_subunit_mirror_modulo"]["p90"] < 1e-6 and errs["all_mirror_modulo"]["under_10"] == 1.0


def test_cryodrgn_abinit_poses_are_read_in_the_convention_that_fits_the_truth(tmp_path):
    """benchmarks/abinit.py's cryoDRGN cases: a pose.N.pkl with transposed rotations and shifts
    in pixels of the other sign reads back as the true poses, with that convention reported."""
    import pickle

    import torch

    from distdrgn.so3_grid import so3_exp

    abinit = load_script("abinit")
    rng = np.random.default_rng(1)
    D, n = 24, 300
    rots = so3_exp(torch.from_numpy(rng.normal(size=(n, 3)) * 2)).float().numpy()
    trans = (rng.normal(size=(n, 2)) * 2 / D).astype(np.float32)  # box fractions, ~2 px
    with open(tmp_path / "pose.6.pkl", "wb") as f:
        pickle.dump((rots.transpose(0, 2, 1), -trans * D), f)
    (found_rots, found_trans), transposed, sign = abinit.cryodrgn_abinit_poses(tmp_path / "pose.6.pkl",
                                                                                (rots, trans), D)
    assert transposed and sign == -1
    np.testing.assert_allclose(found_rots, rots, atol=1e-6)
    np.testing.assert_allclose(found_trans, trans, atol=1e-6)
