"""CLI utilities over pickles and file headers: select --random, concat-pkls, filter-pkl, view-header."""

import json
import pickle

import numpy as np
import pytest

from distdrgn.checkpoint import load_z, save_z
from distdrgn.cli import main as cli
from distdrgn.formats.ind import save_indices
from fixture_files import FIXTURES, needs_fixtures


def _load(path):
    with open(path, "rb") as f:
        return pickle.load(f)


# --- select --random -------------------------------------------------------------------------------

def test_select_random_with_rest(tmp_path, capsys):
    out, rest = tmp_path / "ind.pkl", tmp_path / "rest.pkl"
    assert cli(["select", "--random", "30", "--n-particles", "100", "--seed", "3", "-o", str(out), "-s", str(rest)]) == 0
    chosen, other = _load(out), _load(rest)
    assert chosen.dtype == np.int64 and chosen.shape == (30,) and np.all(np.diff(chosen) > 0)
    assert other.shape == (70,)
    assert np.array_equal(np.sort(np.concatenate([chosen, other])), np.arange(100))
    assert "selected 30 of 100" in capsys.readouterr().out
    # the same seed gives the same subset, another seed another one
    again = tmp_path / "again.pkl"
    assert cli(["select", "--random", "30", "--n-particles", "100", "--seed", "3", "-o", str(again)]) == 0
    assert np.array_equal(_load(again), chosen)
    other_seed = tmp_path / "seed4.pkl"
    assert cli(["select", "--random", "30", "--n-particles", "100", "--seed", "4", "-o", str(other_seed)]) == 0
    assert not np.array_equal(_load(other_seed), chosen)


def test_select_random_from_latents(tmp_path):
    z = tmp_path / "z.pkl"
    save_z(z, np.zeros((40, 2)), np.zeros((40, 2)))
    out = tmp_path / "ind.pkl"
    assert cli(["select", str(z), "--random", "10", "-o", str(out)]) == 0
    ind = _load(out)
    assert ind.shape == (10,) and ind.max() < 40
    assert cli(["select", str(z), "--random", "10", "--n-particles", "41", "-o", str(tmp_path / "b.pkl")]) == 2


def test_select_random_errors(tmp_path, capsys):
    o = str(tmp_path / "x.pkl")
    assert cli(["select", "--random", "101", "--n-particles", "100", "-o", o]) == 2
    assert "cannot select 101" in capsys.readouterr().err
    assert cli(["select", "--random", "0", "--n-particles", "100", "-o", o]) == 2
    assert cli(["select", "--random", "5", "-o", o]) == 2
    assert "--n-particles" in capsys.readouterr().err
    assert cli(["select", "--random", "5", "--n-particles", "10", "--z-norm-above", "1", "-o", o]) == 2
    assert cli(["select", "--random", "5", "--n-particles", "10", "-o", o, "-s", o]) == 2
    assert cli(["select", "--n-particles", "10", "-o", o]) == 2
    assert not (tmp_path / "x.pkl").exists()


# --- concat-pkls -----------------------------------------------------------------------------------

def test_concat_index_ctf_poses_and_z(tmp_path):
    a, b, out = tmp_path / "a.pkl", tmp_path / "b.pkl", tmp_path / "out.pkl"
    save_indices(a, [0, 1, 2])
    save_indices(b, [5, 3])
    assert cli(["concat-pkls", str(a), str(b), "-o", str(out)]) == 0
    assert np.array_equal(_load(out), [0, 1, 2, 5, 3])

    rng = np.random.default_rng(0)
    ctf = [rng.normal(size=(n, 9)).astype(np.float32) for n in (4, 6)]
    poses = [(rng.normal(size=(n, 3, 3)).astype(np.float32), rng.normal(size=(n, 2)).astype(np.float32)) for n in (4, 6)]
    zs = [(rng.normal(size=(n, 3)), rng.normal(size=(n, 3))) for n in (4, 6)]
    for kind in ("ctf", "poses"):
        objs = ctf if kind == "ctf" else poses
        paths = []
        for i, obj in enumerate(objs):
            paths.append(tmp_path / f"{kind}{i}.pkl")
            with open(paths[-1], "wb") as f:
                pickle.dump(obj, f)
        dest = tmp_path / f"{kind}.out.pkl"
        assert cli(["concat-pkls", *map(str, paths), "-o", str(dest)]) == 0
        got = _load(dest)
        if kind == "ctf":
            assert np.array_equal(got, np.concatenate(ctf))
        else:
            assert isinstance(got, tuple) and len(got) == 2
            assert np.array_equal(got[0], np.concatenate([p[0] for p in poses]))
            assert np.array_equal(got[1], np.concatenate([p[1] for p in poses]))
    zpaths = [tmp_path / "z0.pkl", tmp_path / "z1.pkl"]
    for p, (mu, lv) in zip(zpaths, zs):
        save_z(p, mu, lv)
    assert cli(["concat-pkls", *map(str, zpaths), "-o", str(tmp_path / "z.pkl")]) == 0
    mu, lv = load_z(tmp_path / "z.pkl")
    assert mu.shape == (10, 3) and lv is not None
    assert np.allclose(mu, np.concatenate([z[0] for z in zs])) and np.allclose(lv, np.concatenate([z[1] for z in zs]))


def test_concat_mismatch_errors(tmp_path, capsys):
    a, b, c = tmp_path / "a.pkl", tmp_path / "b.pkl", tmp_path / "c.pkl"
    with open(a, "wb") as f:
        pickle.dump(np.zeros((3, 9), np.float32), f)
    with open(b, "wb") as f:
        pickle.dump(np.zeros((3, 8), np.float32), f)
    save_z(c, np.zeros((3, 9)), np.zeros((3, 9)))
    out = tmp_path / "out.pkl"
    assert cli(["concat-pkls", str(a), str(b), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot be concatenated" in err and str(b) in err
    assert cli(["concat-pkls", str(a), str(c), "-o", str(out)]) == 2
    assert cli(["concat-pkls", str(a), str(tmp_path / "missing.pkl"), "-o", str(out)]) == 2
    (tmp_path / "junk.pkl").write_text("not a pickle")
    assert cli(["concat-pkls", str(a), str(tmp_path / "junk.pkl"), "-o", str(out)]) == 2
    assert not out.exists()
    save_indices(out, [1])
    assert cli(["concat-pkls", str(a), str(a), "-o", str(out)]) == 2  # exists, no --force
    assert cli(["concat-pkls", str(a), str(a), "-o", str(out), "--force"]) == 0
    assert _load(out).shape == (6, 9)


# --- filter-pkl ------------------------------------------------------------------------------------

def test_filter_poses_ctf_z_index(tmp_path):
    rng = np.random.default_rng(1)
    ind = tmp_path / "ind.pkl"
    save_indices(ind, [4, 0, 2])
    sel = [4, 0, 2]
    rots, trans = rng.normal(size=(5, 3, 3)).astype(np.float32), rng.normal(size=(5, 2)).astype(np.float32)
    with open(tmp_path / "poses.pkl", "wb") as f:
        pickle.dump((rots, trans), f)
    assert cli(["filter-pkl", str(tmp_path / "poses.pkl"), "--ind", str(ind), "-o", str(tmp_path / "p.pkl")]) == 0
    r, t = _load(tmp_path / "p.pkl")
    assert np.array_equal(r, rots[sel]) and np.array_equal(t, trans[sel])

    ctf = rng.normal(size=(5, 9)).astype(np.float32)
    with open(tmp_path / "ctf.pkl", "wb") as f:
        pickle.dump(ctf, f)
    assert cli(["filter-pkl", str(tmp_path / "ctf.pkl"), "--ind", str(ind), "-o", str(tmp_path / "c.pkl")]) == 0
    assert np.array_equal(_load(tmp_path / "c.pkl"), ctf[sel])

    mu, lv = rng.normal(size=(5, 2)), rng.normal(size=(5, 2))
    save_z(tmp_path / "z.pkl", mu, lv)
    assert cli(["filter-pkl", str(tmp_path / "z.pkl"), "--ind", str(ind), "-o", str(tmp_path / "zf.pkl")]) == 0
    fmu, flv = load_z(tmp_path / "zf.pkl")
    assert np.allclose(fmu, mu[sel]) and np.allclose(flv, lv[sel])

    save_indices(tmp_path / "big.pkl", [10, 11, 12, 13, 14])
    assert cli(["filter-pkl", str(tmp_path / "big.pkl"), "--ind", str(ind), "-o", str(tmp_path / "i.pkl")]) == 0
    assert np.array_equal(_load(tmp_path / "i.pkl"), [14, 10, 12])


@needs_fixtures
def test_filter_real_poses_fixture(tmp_path):
    ind = tmp_path / "ind.pkl"
    save_indices(ind, [1, 3])
    out = tmp_path / "out.pkl"
    assert cli(["filter-pkl", str(FIXTURES / "pose.star.pkl"), "--ind", str(ind), "-o", str(out)]) == 0
    rots, trans = _load(FIXTURES / "pose.star.pkl")
    r, t = _load(out)
    assert np.array_equal(r, rots[[1, 3]]) and np.array_equal(t, trans[[1, 3]])


def test_filter_errors(tmp_path, capsys):
    with open(tmp_path / "ctf.pkl", "wb") as f:
        pickle.dump(np.zeros((5, 9), np.float32), f)
    save_indices(tmp_path / "ind.pkl", [0, 5])
    out = tmp_path / "out.pkl"
    assert cli(["filter-pkl", str(tmp_path / "ctf.pkl"), "--ind", str(tmp_path / "ind.pkl"), "-o", str(out)]) == 2
    assert "[0, 5)" in capsys.readouterr().err
    with open(tmp_path / "bad.pkl", "wb") as f:  # rots and trans of different lengths
        pickle.dump((np.zeros((5, 3, 3)), np.zeros((4, 2))), f)
    save_indices(tmp_path / "ok.pkl", [0])
    assert cli(["filter-pkl", str(tmp_path / "bad.pkl"), "--ind", str(tmp_path / "ok.pkl"), "-o", str(out)]) == 2
    assert "different numbers of rows" in capsys.readouterr().err
    with open(tmp_path / "float_ind.pkl", "wb") as f:
        pickle.dump(np.array([0.0, 1.0]), f)
    assert cli(["filter-pkl", str(tmp_path / "ctf.pkl"), "--ind", str(tmp_path / "float_ind.pkl"), "-o", str(out)]) == 2
    assert not out.exists()


# --- view-header -----------------------------------------------------------------------------------

@needs_fixtures
@pytest.mark.parametrize("name", ["relion31.mrcs", "empiar_10076_7.mrc", "hand-vol.mrc"])
def test_view_header_mrc(name, capsys):
    import warnings

    import mrcfile

    assert cli(["view-header", str(FIXTURES / name), "--json"]) == 0
    header = json.loads(capsys.readouterr().out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # some fixtures lack the MAP id
        with mrcfile.open(FIXTURES / name, permissive=True, header_only=True) as m:
            h = m.header.copy()
        assert header["box"] == [int(h.nx), int(h.ny)] and header["n_images"] == int(h.nz)
        assert header["mode"].startswith(str(int(h.mode)))
        if int(h.mx) > 0 and float(h.cella.x) > 0:
            assert header["voxel size (A)"][0] == pytest.approx(float(h.cella.x) / int(h.mx))
    assert cli(["view-header", str(FIXTURES / name)]) == 0
    text = capsys.readouterr().out
    assert "box:" in text and "n_images:" in text and "voxel size (A):" in text and "origin (A):" in text


@needs_fixtures
def test_view_header_star(capsys):
    from distdrgn.formats.star import read_star

    path = FIXTURES / "relion31.star"
    assert cli(["view-header", str(path)]) == 0
    text = capsys.readouterr().out
    star = read_star(path)
    assert "data_optics" in text and "data_particles" in text
    assert f"{len(star.particles)} rows" in text and "rlnImageName" in text
    assert cli(["view-header", str(path), "--json"]) == 0
    header = json.loads(capsys.readouterr().out)
    assert header["tables"]["data_particles"]["rows"] == len(star.particles)


@needs_fixtures
def test_view_header_cs(capsys):
    path = FIXTURES / "cryosparc_P12_J24_001_particles.cs"
    arr = np.load(path)
    assert cli(["view-header", str(path), "--json"]) == 0
    header = json.loads(capsys.readouterr().out)
    assert header["records"] == len(arr) and list(header["fields"]) == list(arr.dtype.names)
    assert cli(["view-header", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"records: {len(arr)}" in text and arr.dtype.names[0] in text


def test_view_header_store_and_errors(tmp_path, capsys):
    from distdrgn.formats.mrc import write_mrc

    stack = tmp_path / "p.mrcs"
    write_mrc(stack, np.random.default_rng(0).normal(size=(6, 16, 16)).astype(np.float32), apix=2.0)
    assert cli(["view-header", str(stack)]) == 0
    text = capsys.readouterr().out
    assert "box: 16 16" in text and "n_images: 6" in text and "voxel size (A): 2" in text
    store = tmp_path / "s.zarr"
    assert cli(["ingest", str(stack), "-o", str(store), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli(["view-header", str(store)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 6 and summary["D"] == 16
    assert cli(["view-header", str(tmp_path / "missing.mrc")]) == 2
    (tmp_path / "x.txt").write_text("hi")
    assert cli(["view-header", str(tmp_path / "x.txt")]) == 2
    (tmp_path / "bad.star").write_text("this is not a star file\n")
    capsys.readouterr()
    assert cli(["view-header", str(tmp_path / "bad.star")]) == 2
    assert cli(["view-header", str(tmp_path)]) == 2  # a directory that is not a store
