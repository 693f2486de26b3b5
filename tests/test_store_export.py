"""``store export -o X.star|X.cs`` writes the particles' original rows: every column survives.

Real RELION 3.0 / 3.1 / 5 stars and cryoSPARC .cs files (fixture_files.FIXTURES) are ingested,
a subset is exported by an ind.pkl, and the result is read back with starfile (numpy for .cs)
and compared with the original rows at those indices, column by column.
"""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from distdrgn.cli import main as cli
from fixture_files import FIXTURES, needs_fixtures
from store_helpers import make_dataset

REPO = Path(__file__).resolve().parents[1]


def _fake_stacks(folder: Path, names_counts: dict, D: int = 8) -> Path:
    """Stacks named like the star's (basenames, found through --datadir) with enough images."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name, count in names_counts.items():
        with mrcfile.new(folder / Path(name).name, overwrite=True) as m:
            m.set_data(rng.normal(size=(count, D, D)).astype(np.float32))
            m.set_image_stack()
            m.voxel_size = 1.0
    return folder


def _star_stack_counts(path: Path) -> dict:
    blocks = starfile.read(path, always_dict=True)
    table = next(t for k, t in blocks.items() if k != "optics")
    parts = table["rlnImageName"].astype(str).str.partition("@")
    idx = parts[0].astype(int)
    return idx.groupby(parts[2]).max().to_dict()


def _write_ind(path: Path, ind) -> Path:
    with open(path, "wb") as f:
        pickle.dump(np.asarray(ind, dtype=np.int64), f)
    return path


def _particle_table(blocks: dict) -> pd.DataFrame:
    tables = [t for k, t in blocks.items() if k != "optics"]
    assert len(tables) == 1
    return tables[0]


# (fixture, needs fake stacks, extra ingest args)
STARS = [
    ("toy_projections.star", False, ["--apix", "1.0"]),  # RELION 3.0, data_images, a dummyVariable column
    ("empiar_10076_7.star", False, []),  # RELION 3.0, bare data_
    ("FinalRefinement-OriginalParticles-PfCRT.star", True, ["--apix", "1.035", "-w", "0.1"]),  # RELION 3.0.6
    ("relion31.star", False, []),  # RELION 3.1
    ("relion31.6opticsgroups.star", True, []),  # RELION 3.1, 6 optics groups
    ("relion5.star", True, []),  # RELION 5 (version 50001)
]


@needs_fixtures
@pytest.mark.parametrize("name,fake,extra", STARS, ids=[s[0] for s in STARS])
def test_star_subset_keeps_every_column(tmp_path, name, fake, extra):
    src = FIXTURES / name
    args = ["ingest", str(src), "--no-progress", "-o", str(tmp_path / "s.zarr"), *extra]
    if fake:
        args += ["--datadir", str(_fake_stacks(tmp_path / "stacks", _star_stack_counts(src)))]
    assert cli(args) == 0
    original = starfile.read(src, always_dict=True)
    n = len(_particle_table(original))
    ind = np.array([n - 1, 0, n // 2, 1]) if n > 2 else np.array([1, 0])
    out = tmp_path / "subset.star"
    assert cli(["store", "export", str(tmp_path / "s.zarr"), "--ind", str(_write_ind(tmp_path / "ind.pkl", ind)),
                "-o", str(out), "--no-progress"]) == 0
    assert not (tmp_path / "subset.mrcs").exists()  # the rows point at the user's own stacks
    back = starfile.read(out, always_dict=True)
    assert list(back) == list(original)  # same blocks, same names, same order
    want = _particle_table(original).iloc[ind].reset_index(drop=True)
    got = _particle_table(back)
    assert list(got.columns) == list(want.columns)
    pd.testing.assert_frame_equal(got, want)
    if "optics" in original:
        pd.testing.assert_frame_equal(back["optics"], original["optics"])
        version = [ln.strip() for ln in src.read_text().splitlines() if ln.startswith("# version")]
        if version:  # RELION's file version comes back too
            assert version[0] in out.read_text()
    # and distdrgn reads the exported star like the original (images from the same stacks)
    again = ["ingest", str(out), "--no-progress", "-o", str(tmp_path / "again.zarr"), *extra]
    if fake:
        again += ["--datadir", str(tmp_path / "stacks")]
    elif out.parent != src.parent:
        again += ["--datadir", str(src.parent)]
    assert cli(again) == 0
    from distdrgn.store import ParticleStore

    a, b = ParticleStore.open(tmp_path / "s.zarr"), ParticleStore.open(tmp_path / "again.zarr")
    assert np.array_equal(b.images(np.arange(len(ind))), a.images(ind))


CS = [("empiar_10076_7.cs", False), ("cryosparc_J2_particles_exported.cs", True)]


@needs_fixtures
@pytest.mark.parametrize("name,fake", CS, ids=[c[0] for c in CS])
def test_cs_subset_keeps_every_field(tmp_path, name, fake):
    src = FIXTURES / name
    records = np.load(src)
    args = ["ingest", str(src), "--no-progress", "-o", str(tmp_path / "s.zarr")]
    if fake:
        paths = records["blob/path"].astype(str)
        counts = {p.lstrip(">"): int(records["blob/idx"][paths == p].max()) + 1 for p in np.unique(paths)}
        args += ["--datadir", str(_fake_stacks(tmp_path / "stacks", counts, D=int(records["blob/shape"][0, 0])))]
    assert cli(args) == 0
    ind = np.array([len(records) - 1, 0, 3, 2])
    out = tmp_path / "subset.cs"
    assert cli(["store", "export", str(tmp_path / "s.zarr"), "--ind", str(_write_ind(tmp_path / "ind.pkl", ind)),
                "-o", str(out), "--no-progress"]) == 0
    assert not (tmp_path / "subset.mrcs").exists()
    back = np.load(out)
    assert back.dtype == records.dtype
    assert np.array_equal(back, records[ind])
    assert np.array_equal(back["uid"], records["uid"][ind])


@needs_fixtures
def test_ingest_ind_then_export_maps_through_original_index(tmp_path):
    src = FIXTURES / "toy_projections.star"
    keep = np.array([900, 3, 500, 42, 7])
    assert cli(["ingest", str(src), "--ind", str(_write_ind(tmp_path / "keep.pkl", keep)), "--apix", "1",
                "--no-progress", "-o", str(tmp_path / "s.zarr")]) == 0
    info = subprocess.run([sys.executable, "-m", "distdrgn.cli", "store", "info", str(tmp_path / "s.zarr")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    summary = json.loads(info.stdout)["source_metadata"]
    assert summary["kind"] == "star" and summary["rows"] == len(keep) and summary["columns"] == 9
    ind = np.array([4, 1])
    out = tmp_path / "sub.star"
    assert cli(["store", "export", str(tmp_path / "s.zarr"), "--ind", str(_write_ind(tmp_path / "ind.pkl", ind)),
                "-o", str(out), "--no-progress"]) == 0
    want = starfile.read(src)
    got = starfile.read(out)
    pd.testing.assert_frame_equal(got, want.iloc[keep[ind]].reset_index(drop=True))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "distdrgn.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_bare_stack_store_needs_new_stack(tmp_path):
    paths, _ = make_dataset(tmp_path, n=10, D=16)
    store = tmp_path / "s.zarr"
    assert cli(["ingest", str(paths["stack"]), "--no-progress", "-o", str(store)]) == 0
    for suffix in (".star", ".cs"):
        res = _run("store", "export", store, "-o", tmp_path / f"x{suffix}", "--no-progress")
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--new-stack" in res.stderr, res.stderr
        assert not (tmp_path / f"x{suffix}").exists() and not (tmp_path / "x.mrcs").exists()
        res = _run("store", "export", store, "-o", tmp_path / f"x{suffix}", "--new-stack", "--no-progress")
        assert res.returncode == 0 and (tmp_path / "x.mrcs").is_file(), res.stderr
        (tmp_path / "x.mrcs").unlink()


@needs_fixtures
def test_original_rows_errors_are_one_line(tmp_path):
    store = tmp_path / "s.zarr"
    assert cli(["ingest", str(FIXTURES / "empiar_10076_7.cs"), "--no-progress", "-o", str(store)]) == 0
    for args, message in [(["-o", tmp_path / "x.star"], "only be written as .cs"),
                          (["-o", tmp_path / "x.cs", "--level", 320], "--new-stack")]:
        res = _run("store", "export", store, *args, "--no-progress")
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert not (tmp_path / "x.star").exists() and not (tmp_path / "x.cs").exists()


POSE_SOURCES = [("relion31.star", False, []), ("empiar_10076_7.star", False, []),  # origins in A, in pixels
                ("empiar_10076_7.cs", False, [])]


@needs_fixtures
@pytest.mark.parametrize("name,fake,extra", POSE_SOURCES, ids=[s[0] for s in POSE_SOURCES])
def test_export_with_poses_replaces_only_the_pose_columns(tmp_path, name, fake, extra):
    """``--poses RUN/poses.pkl`` (abinit, pose refinement): the original rows, their poses replaced."""
    from distdrgn.formats.poses import parse_poses
    from distdrgn.lattice import random_rotations
    from distdrgn.store import ParticleStore

    src = FIXTURES / name
    assert cli(["ingest", str(src), "--no-progress", "-o", str(tmp_path / "s.zarr"), *extra]) == 0
    store = ParticleStore.open(tmp_path / "s.zarr")
    rots = random_rotations(store.n, __import__("torch").Generator().manual_seed(0)).float().numpy()
    trans = np.random.default_rng(0).uniform(-0.05, 0.05, (store.n, 2)).astype(np.float32)
    with open(tmp_path / "poses.pkl", "wb") as f:
        pickle.dump((rots, trans), f)
    out = tmp_path / f"found{src.suffix}"
    assert cli(["store", "export", str(tmp_path / "s.zarr"), "-o", str(out), "--poses", str(tmp_path / "poses.pkl"),
                "--no-progress"]) == 0
    got_rots, got_trans = parse_poses(out, D=store.D)
    np.testing.assert_allclose(got_rots, rots, atol=2e-5)
    np.testing.assert_allclose(got_trans, trans, atol=1e-6)
    plain = tmp_path / f"plain{src.suffix}"
    assert cli(["store", "export", str(tmp_path / "s.zarr"), "-o", str(plain), "--no-progress"]) == 0
    pose_fields = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY", "rlnOriginXAngst",
                   "rlnOriginYAngst", "alignments3D/pose", "alignments3D/shift")
    if src.suffix == ".star":
        a, b = _particle_table(starfile.read(out, always_dict=True)), _particle_table(starfile.read(plain, always_dict=True))
        assert [c for c in a.columns if c not in pose_fields] == [c for c in b.columns if c not in pose_fields]
        if "optics" not in starfile.read(plain, always_dict=True):  # RELION 3.0: origins stay in pixels
            assert "rlnOriginX" in a.columns and "rlnOriginXAngst" not in a.columns
        others = [c for c in b.columns if c not in pose_fields]
        pd.testing.assert_frame_equal(a[others], b[others])
    else:
        a, b = np.load(out), np.load(plain)
        assert a.dtype.names[: len(b.dtype.names)] == b.dtype.names  # alignments3D/ fields appended when missing
        for field in (f for f in b.dtype.names if f not in pose_fields):
            assert np.array_equal(a[field], b[field]), field
