import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distdrgn.cli import main as cli
from distdrgn.store import ParticleStore
from store_helpers import make_dataset

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "formats"


def run(*args):
    return subprocess.run([sys.executable, "-m", "distdrgn.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    paths, data = make_dataset(tmp, n=60)
    out = tmp / "s.zarr"
    res = run("ingest", paths["stack"], "--poses", paths["poses"], "--ctf", paths["ctf"], "--levels", "16",
              "--no-progress", "-o", out)
    assert res.returncode == 0, res.stderr
    return tmp, paths, data, out


def test_info_and_verify(dataset):
    tmp, paths, data, out = dataset
    res = run("store", "info", out)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["n"] == 60 and summary["levels"] == [32, 16] and summary["has_poses"] and summary["has_ctf"]
    res = run("store", "verify", "--no-progress", out)
    assert res.returncode == 0 and res.stdout.startswith("ok:")


def test_verify_failure_is_one_line(dataset, tmp_path):
    tmp, paths, data, out = dataset
    import shutil

    bad = tmp_path / "bad.zarr"
    shutil.copytree(out, bad)
    shard = next(p for p in (bad / "images" / "c").rglob("*") if p.is_file())
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    res = run("store", "verify", "--no-progress", bad)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error:") and "checksum mismatch" in res.stderr


@pytest.mark.parametrize("suffix", [".star", ".cs"])
def test_export_then_ingest_round_trip(dataset, tmp_path, suffix):
    tmp, paths, data, out = dataset
    target = tmp_path / f"exp{suffix}"
    assert cli(["store", "export", str(out), "--new-stack", "--no-progress", "-o", str(target)]) == 0
    assert (tmp_path / "exp.mrcs").is_file()
    back = tmp_path / "back.zarr"
    assert cli(["ingest", str(target), "--no-progress", "-o", str(back)]) == 0
    a, b = ParticleStore.open(out), ParticleStore.open(back)
    assert np.array_equal(b.images(np.arange(60)), data["images"])
    np.testing.assert_allclose(b.poses[0], a.poses[0], atol=1e-6)
    np.testing.assert_allclose(b.poses[1], a.poses[1], atol=1e-7)
    np.testing.assert_allclose(b.ctf, a.ctf, rtol=1e-6, atol=1e-5)
    if suffix == ".star":
        assert np.array_equal(b.ctf, a.ctf)


def test_export_mrcs_subset_and_level(dataset, tmp_path):
    import mrcfile

    tmp, paths, data, out = dataset
    ind = np.array([5, 1, 40])
    with open(tmp_path / "ind.pkl", "wb") as f:
        pickle.dump(ind, f)
    target = tmp_path / "sub.mrcs"
    res = run("store", "export", out, "--ind", tmp_path / "ind.pkl", "--level", 16, "--no-progress", "-o", target)
    assert res.returncode == 0, res.stderr
    with mrcfile.open(target) as m:
        assert np.array_equal(m.data, ParticleStore.open(out, 16).images(ind))
        assert float(m.voxel_size.x) == pytest.approx(4.0)
    res = run("store", "export", out, "--no-progress", "-o", target)
    assert res.returncode == 2 and "already exists" in res.stderr


def test_cli_ingest_errors_are_one_line(dataset, tmp_path):
    tmp, paths, data, out = dataset
    cases = [
        (["ingest", paths["stack"], "-o", out], "already exists"),
        (["ingest", paths["stack"], "-D", 31, "-o", tmp_path / "a.zarr"], "must be even"),
        (["ingest", paths["stack"], "-D", 64, "-o", tmp_path / "a.zarr"], "at most the box size"),
        (["ingest", tmp_path / "missing.mrcs", "-o", tmp_path / "a.zarr"], "no such file"),
        (["ingest", paths["poses"], "-o", tmp_path / "a.zarr"], "unknown particle file type"),
        (["store", "info", tmp_path / "a.zarr"], "no such particle store"),
        (["store", "info", str(out) + ".partial"], "no such particle store"),
    ]
    for args, message in cases:
        res = run(*args)
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.startswith("error:") and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "a.zarr.partial").exists()


def test_star_count_mismatch_with_stack(dataset, tmp_path):
    tmp, paths, data, out = dataset
    star = tmp_path / "x.star"
    assert cli(["store", "export", str(out), "--new-stack", "--no-progress", "-o", str(star)]) == 0
    text = star.read_text().replace("000060@exp", "000061@exp").replace("000060@x", "000061@x")
    star.write_text(text)
    res = run("ingest", star, "-o", tmp_path / "a.zarr")
    assert res.returncode == 2 and "which has 60 images" in res.stderr


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="shared format fixtures not present")
@pytest.mark.parametrize("name,n,D", [("relion31.star", 5, 256), ("empiar_10076_7.cs", 7, 320)])
def test_ingest_real_fixtures(tmp_path, name, n, D):
    res = run("ingest", FIXTURES / name, "--no-progress", "-o", tmp_path / "f.zarr")
    assert res.returncode == 0, res.stderr
    s = ParticleStore.open(tmp_path / "f.zarr")
    assert (s.n, s.D) == (n, D) and s.ctf is not None
    from distdrgn.formats.particles import resolve_particles

    src = resolve_particles(FIXTURES / name)
    assert (s.poses is None) == (src.poses is None)
    if src.poses is not None:
        assert np.array_equal(s.poses[0], src.poses[0]) and np.array_equal(s.poses[1], src.poses[1])
    assert np.array_equal(s.images(np.arange(n)), src.read(np.arange(n)))
    assert np.array_equal(s.ctf, src.ctf.astype(np.float32))


@pytest.mark.parametrize("action,words", [("info", "JSON summary"), ("verify", "crc32c recorded at ingest"),
                                          ("export", "original .star/.cs rows")])
def test_store_subcommand_help_has_a_description(action, words, capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["store", action, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse re-wraps the description
    head = text.split("positional arguments")[0]
    assert words in head
