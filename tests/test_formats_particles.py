import shutil

import mrcfile
import numpy as np
import pandas as pd
import pytest

from distdrgn.errors import FormatError
from distdrgn.formats.cs import write_cs
from distdrgn.formats.ctf_params import parse_ctf
from distdrgn.formats.mrc import write_mrc
from distdrgn.formats.particles import resolve_particles
from distdrgn.formats.poses import parse_poses
from distdrgn.formats.star import write_star

from fixture_files import FIXTURES, needs_fixtures, read_mrc_data


def _stack(path, n, D=8, offset=0.0):
    """A stack whose image i is filled with offset + i (so reads are easy to check)."""
    data = offset + np.arange(n, dtype=np.float32)[:, None, None] * np.ones((1, D, D), dtype=np.float32)
    write_mrc(path, data, apix=1.5)
    return data


# ----- fixtures -----

@needs_fixtures
def test_relion31_star():
    src = resolve_particles(FIXTURES / "relion31.star")
    assert (src.n, src.D, src.kind, len(src)) == (5, 256, "star", 5)
    assert src.apix == pytest.approx(2.806)
    assert src.source_files == [FIXTURES / "relion31.star", FIXTURES / "relion31.mrcs"]
    np.testing.assert_array_equal(src.index_in_stack, np.arange(5))
    rots, trans = parse_poses(FIXTURES / "relion31.star", 256)
    np.testing.assert_array_equal(src.poses[0], rots)
    np.testing.assert_array_equal(src.poses[1], trans)
    np.testing.assert_array_equal(src.ctf, parse_ctf(FIXTURES / "relion31.star"))
    full = read_mrc_data(FIXTURES / "relion31.mrcs")
    np.testing.assert_array_equal(src.read([4, 0, 2]), full[[4, 0, 2]])


@needs_fixtures
def test_empiar_star_and_cs_describe_the_same_particles():
    from_star = resolve_particles(FIXTURES / "empiar_10076_7.star")
    from_cs = resolve_particles(FIXTURES / "empiar_10076_7.cs")
    for src in (from_star, from_cs):
        assert (src.n, src.D) == (7, 320)
        assert src.poses is None  # neither file has alignments
        assert src.stacks[0].path == FIXTURES / "empiar_10076_7.mrc"
    assert from_star.kind == "star" and from_cs.kind == "cs"
    np.testing.assert_array_equal(from_star.index_in_stack, from_cs.index_in_stack)
    np.testing.assert_allclose(from_star.ctf, from_cs.ctf, rtol=1e-6)
    np.testing.assert_array_equal(from_star.read([6, 1]), from_cs.read([6, 1]))
    np.testing.assert_array_equal(from_star.read([6, 1]), read_mrc_data(FIXTURES / "empiar_10076_7.mrc")[[6, 1]])


@needs_fixtures
def test_toy_projections_star():
    with pytest.raises(FormatError, match="--apix"):
        resolve_particles(FIXTURES / "toy_projections.star")
    # CTF from elsewhere (a ctf.pkl): the file's missing pixel size is no obstacle
    src = resolve_particles(FIXTURES / "toy_projections.star", with_ctf=False)
    assert src.ctf is None and src.n == 1000
    src = resolve_particles(FIXTURES / "toy_projections.star", apix=2.0)
    assert (src.n, src.D, src.apix) == (1000, 30, 2.0)
    assert src.poses is None
    np.testing.assert_allclose(src.ctf[0], [30, 2.0, 0, 0, 0, 300, 0.001, 0.1, 90], rtol=1e-6)
    full = read_mrc_data(FIXTURES / "toy_projections.mrcs")
    order = [999, 3, 4, 5, 0, 3]
    np.testing.assert_array_equal(src.read(order), full[order])
    np.testing.assert_array_equal(src.read(slice(10, 13)), full[10:13])


@needs_fixtures
def test_single_stack_inputs():
    src = resolve_particles(FIXTURES / "hand.mrcs")
    assert (src.n, src.D, src.kind, src.poses, src.ctf) == (100, 64, "mrcs", None, None)
    assert src.source_files == [FIXTURES / "hand.mrcs"]
    src = resolve_particles(FIXTURES / "empiar_10076_7.mrc")
    assert (src.n, src.D, src.apix) == (7, 320, None)


@needs_fixtures
def test_missing_stacks_of_fixture_metadata_are_reported():
    with pytest.raises(FormatError, match="particle stack 'toy_images_a.mrcs' not found.*--datadir"):
        resolve_particles(FIXTURES / "relion5.star")
    with pytest.raises(FormatError, match="J19/extract/.*not found"):
        resolve_particles(FIXTURES / "cryosparc_P12_J24_001_particles.cs")


# ----- path resolution -----

def test_txt_list_relative_and_datadir(tmp_path):
    a = _stack(tmp_path / "a.mrcs", 3)
    (tmp_path / "sub").mkdir()
    b = _stack(tmp_path / "sub" / "b.mrcs", 4, offset=100)
    (tmp_path / "list.txt").write_text("a.mrcs\n\n# comment\nsub/b.mrcs\n")
    src = resolve_particles(tmp_path / "list.txt")
    assert (src.n, src.D, src.kind, src.apix) == (7, 8, "txt", 1.5)
    assert src.source_files == [tmp_path / "list.txt", tmp_path / "a.mrcs", tmp_path / "sub" / "b.mrcs"]
    np.testing.assert_array_equal(src.stack_id, [0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(src.index_in_stack, [0, 1, 2, 0, 1, 2, 3])
    both = np.concatenate([a, b])
    order = [6, 0, 4, 2, 3, 3]
    np.testing.assert_array_equal(src.read(order), both[order])
    # with --datadir, paths are relative to it; a missing one falls back to datadir/basename
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "list.txt").write_text("a.mrcs\nold/project/b.mrcs\n")
    shutil.copy(tmp_path / "sub" / "b.mrcs", tmp_path / "b.mrcs")
    src = resolve_particles(elsewhere / "list.txt", datadir=tmp_path)
    assert [s.path for s in src.stacks] == [tmp_path / "a.mrcs", tmp_path / "b.mrcs"]


def _star_over(tmp_path, names, stack_dir_name="stacks"):
    particles = pd.DataFrame({"rlnImageName": names, "rlnAngleRot": 10.0, "rlnAngleTilt": 20.0,
                              "rlnAnglePsi": 30.0, "rlnOriginX": 2.0, "rlnOriginY": -1.0,
                              "rlnDefocusU": 10000.0, "rlnDefocusV": 9000.0, "rlnDefocusAngle": 5.0,
                              "rlnVoltage": 300.0, "rlnSphericalAberration": 2.7,
                              "rlnAmplitudeContrast": 0.1, "rlnDetectorPixelSize": 5.0, "rlnMagnification": 50000.0})
    path = tmp_path / "p.star"
    write_star(path, particles)
    return path


def test_star_over_several_stacks_with_datadir_basename_fallback(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    a = _stack(data_dir / "a.mrcs", 5)
    b = _stack(data_dir / "b.mrcs", 2, offset=50)
    # paths as RELION wrote them, relative to a project folder that is not here
    names = ["000002@Extract/job1/b.mrcs", "000005@Extract/job1/a.mrcs", "000001@Extract/job1/a.mrcs",
             "000001@Extract/job1/b.mrcs"]
    star = _star_over(tmp_path, names)
    with pytest.raises(FormatError, match="not found"):
        resolve_particles(star)
    src = resolve_particles(star, datadir=data_dir)
    assert [s.path for s in src.stacks] == [data_dir / "b.mrcs", data_dir / "a.mrcs"]  # order of first use
    np.testing.assert_array_equal(src.stack_id, [0, 1, 1, 0])
    np.testing.assert_array_equal(src.index_in_stack, [1, 4, 0, 0])
    expected = np.stack([b[1], a[4], a[0], b[0]])
    np.testing.assert_array_equal(src.read([0, 1, 2, 3]), expected)
    np.testing.assert_array_equal(src.read([3, 1]), expected[[3, 1]])
    np.testing.assert_allclose(src.poses[1], [[2 / 8, -1 / 8]] * 4)
    assert src.apix == pytest.approx(1.0)  # 5 um / 50000
    np.testing.assert_allclose(src.ctf[:, :2], [[8, 1.0]] * 4)
    # D_hint: metadata in pixels of a different box
    src = resolve_particles(star, datadir=data_dir, D_hint=16)
    np.testing.assert_allclose(src.poses[1], [[2 / 16, -1 / 16]] * 4)
    assert (src.ctf[:, 0] == 16).all() and src.D == 8
    src = resolve_particles(star, datadir=data_dir, with_poses=False)
    assert src.poses is None and src.ctf is not None


def test_cs_with_imported_paths(tmp_path):
    _stack(tmp_path / "s.mrcs", 3)
    arr = np.zeros(2, dtype=[("blob/path", "S20"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
                             ("blob/psize_A", "<f4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
                             ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
                             ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"),
                             ("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,))])
    arr["blob/path"] = [b">J1/imported/s.mrcs", b">J1/imported/s.mrcs"]
    arr["blob/idx"] = [2, 0]
    arr["blob/shape"] = 8
    arr["blob/psize_A"] = 1.25
    arr["alignments3D/shift"] = [[4, 0], [0, -2]]
    write_cs(tmp_path / "p.cs", arr)
    src = resolve_particles(tmp_path / "p.cs", datadir=tmp_path)
    assert (src.n, src.D, src.kind, src.apix) == (2, 8, "cs", 1.25)
    np.testing.assert_array_equal(src.index_in_stack, [2, 0])
    np.testing.assert_array_equal(src.read([0, 1])[:, 0, 0], [2, 0])
    np.testing.assert_allclose(src.poses[1], [[0.5, 0], [0, -0.25]])
    np.testing.assert_allclose(src.poses[0], np.broadcast_to(np.eye(3), (2, 3, 3)))


# ----- errors -----

def test_error_unknown_extension(tmp_path):
    (tmp_path / "p.hdf").write_text("x")
    with pytest.raises(FormatError, match="unknown particle file type '.hdf'"):
        resolve_particles(tmp_path / "p.hdf")


def test_error_missing_input_and_datadir(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        resolve_particles(tmp_path / "none.star")
    _stack(tmp_path / "a.mrcs", 2)
    with pytest.raises(FormatError, match="--datadir is not a folder"):
        resolve_particles(tmp_path / "a.mrcs", datadir=tmp_path / "nope")


def test_error_missing_stack(tmp_path):
    (tmp_path / "list.txt").write_text("gone.mrcs\n")
    with pytest.raises(FormatError, match="'gone.mrcs' not found"):
        resolve_particles(tmp_path / "list.txt")


def test_error_row_past_end_of_stack(tmp_path):
    _stack(tmp_path / "a.mrcs", 3)
    star = _star_over(tmp_path, ["000001@a.mrcs", "000004@a.mrcs"])
    with pytest.raises(FormatError, match=r"row 1 points to image 4 \(1-based\).*has 3 images"):
        resolve_particles(star)
    star = _star_over(tmp_path, ["000000@a.mrcs"])
    with pytest.raises(FormatError, match="row 0 points to image 0"):
        resolve_particles(star)


def test_error_bad_image_name(tmp_path):
    _stack(tmp_path / "a.mrcs", 3)
    for bad in ["a.mrcs", "x@a.mrcs", "1@"]:
        star = _star_over(tmp_path, ["1@a.mrcs", bad])
        with pytest.raises(FormatError, match="row 1: _rlnImageName"):
            resolve_particles(star)


def test_error_different_box_sizes(tmp_path):
    _stack(tmp_path / "a.mrcs", 2, D=8)
    _stack(tmp_path / "b.mrcs", 2, D=10)
    (tmp_path / "list.txt").write_text("a.mrcs\nb.mrcs\n")
    with pytest.raises(FormatError, match=r"different box sizes \(a.mrcs: 8, b.mrcs: 10\)"):
        resolve_particles(tmp_path / "list.txt")


def test_error_odd_and_non_square_box(tmp_path):
    write_mrc(tmp_path / "odd.mrcs", np.zeros((2, 7, 7)))
    with pytest.raises(FormatError, match="odd"):
        resolve_particles(tmp_path / "odd.mrcs")
    with mrcfile.new(tmp_path / "rect.mrcs") as m:
        m.set_data(np.zeros((2, 8, 6), dtype=np.float32))
    (tmp_path / "list.txt").write_text("rect.mrcs\n")
    with pytest.raises(FormatError, match="square"):
        resolve_particles(tmp_path / "list.txt")


def test_error_truncated_stack(tmp_path):
    _stack(tmp_path / "a.mrcs", 4)
    raw = (tmp_path / "a.mrcs").read_bytes()
    (tmp_path / "a.mrcs").write_bytes(raw[:-10])
    star = _star_over(tmp_path, ["1@a.mrcs"])
    with pytest.raises(FormatError, match="truncated"):
        resolve_particles(star)


def test_error_empty_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(FormatError, match="lists no particle stacks"):
        resolve_particles(tmp_path / "empty.txt")
    with mrcfile.new(tmp_path / "empty.mrcs") as m:
        m.set_data(np.zeros((0, 8, 8), dtype=np.float32))
    with pytest.raises(FormatError, match="no particles"):
        resolve_particles(tmp_path / "empty.mrcs")
    (tmp_path / "empty.star").write_text("data_particles\n\nloop_\n_rlnImageName #1\n")
    with pytest.raises(FormatError, match="empty"):
        resolve_particles(tmp_path / "empty.star")
    arr = np.zeros(0, dtype=[("blob/path", "S4"), ("blob/idx", "<u4")])
    write_cs(tmp_path / "empty.cs", arr)
    with pytest.raises(FormatError, match="no particles"):
        resolve_particles(tmp_path / "empty.cs")


def test_source_pickles_for_data_loader_workers(tmp_path):
    import pickle

    a = _stack(tmp_path / "a.mrcs", 3)
    src = pickle.loads(pickle.dumps(resolve_particles(tmp_path / "a.mrcs")))
    np.testing.assert_array_equal(src.read([2, 1]), a[[2, 1]])
