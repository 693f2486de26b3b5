import pickle

import numpy as np
import pandas as pd
import pytest

from distdrgn.errors import FormatError
from distdrgn.formats.cs import write_cs
from distdrgn.formats.ctf_params import load_ctf, parse_ctf, save_ctf
from distdrgn.formats.poses import (
    axis_angle_to_rot,
    euler_to_rot,
    load_poses,
    parse_poses,
    rot_to_axis_angle,
    rot_to_euler,
    save_poses,
)
from distdrgn.formats.star import read_star, write_star

from fixture_files import FIXTURES, needs_fixtures
PFCRT = FIXTURES / "FinalRefinement-OriginalParticles-PfCRT.star"
P12 = FIXTURES / "cryosparc_P12_J24_001_particles.cs"


def _pickle(name):
    with open(FIXTURES / name, "rb") as f:
        return pickle.load(f)


def _random_rots(n, seed=0):
    return axis_angle_to_rot(np.random.default_rng(seed).normal(size=(n, 3)))


# ----- ground truth: cryoDRGN's own parses -----

@needs_fixtures
def test_star_poses_match_cryodrgn():
    rots, trans = parse_poses(PFCRT, 300)
    ref_rots, ref_trans = _pickle("pose.star.pkl")
    assert rots.dtype == np.float32 and trans.dtype == np.float32
    assert rots.shape == (5, 3, 3) and trans.shape == (5, 2)
    np.testing.assert_allclose(rots, ref_rots, rtol=0, atol=1e-6)
    np.testing.assert_allclose(trans, ref_trans, rtol=1e-6, atol=1e-9)


@needs_fixtures
def test_cs_poses_match_cryodrgn():
    rots, trans = parse_poses(P12, None)  # box from blob/shape: 180
    ref_rots, ref_trans = _pickle("pose.cs.pkl")
    assert rots.shape == (2019, 3, 3)
    np.testing.assert_allclose(rots, ref_rots, rtol=0, atol=1e-5)
    np.testing.assert_allclose(trans, ref_trans, rtol=1e-6, atol=1e-9)
    # giving the same box explicitly changes nothing; another box rescales the shifts
    np.testing.assert_array_equal(parse_poses(P12, 180)[1], trans)
    np.testing.assert_allclose(parse_poses(P12, 90)[1], 2 * trans, rtol=1e-6)


@needs_fixtures
def test_star_ctf_matches_cryodrgn():
    ctf = parse_ctf(PFCRT, D=300, apix=1.035, w=0.1)
    ref = _pickle("ctf1.pkl")
    assert ctf.dtype == np.float32 and ctf.shape == (5, 9)
    np.testing.assert_allclose(ctf, ref, rtol=1e-7, atol=0)
    # RELION 3.0's detector pixel size / magnification give the same 1.035 A/px
    np.testing.assert_allclose(parse_ctf(PFCRT, D=300, w=0.1), ref, rtol=1e-7, atol=0)


@needs_fixtures
def test_cs_ctf_matches_cryodrgn():
    ctf = parse_ctf(P12)
    ref = _pickle("ctf2.pkl")
    assert ctf.shape == (2019, 9)
    np.testing.assert_allclose(ctf, ref, rtol=1e-6, atol=1e-5)


# ----- other RELION layouts -----

@needs_fixtures
def test_relion31_origins_in_angstrom():
    rots, trans = parse_poses(FIXTURES / "relion31.star", None)  # box 256 from the optics table
    p = read_star(FIXTURES / "relion31.star").particles
    expected = p[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / 2.806 / 256
    np.testing.assert_allclose(trans, expected, rtol=1e-6)
    np.testing.assert_allclose(rots, euler_to_rot(p[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()),
                               atol=1e-6)
    ctf = parse_ctf(FIXTURES / "relion31.star")
    np.testing.assert_allclose(ctf[:, [0, 1, 5, 6, 7, 8]], [[256, 2.806, 300, 0.01, 0.1, 0]] * 5, rtol=1e-6)
    np.testing.assert_allclose(ctf[:, 2], p["rlnDefocusU"], rtol=1e-7)
    np.testing.assert_allclose(ctf[:, 4], p["rlnDefocusAngle"], rtol=1e-6)


@needs_fixtures
def test_relion31_six_optics_groups_use_their_own_values():
    path = FIXTURES / "relion31.6opticsgroups.star"
    star = read_star(path)
    optics = star.optics.set_index("rlnOpticsGroup")
    group = star.particles["rlnOpticsGroup"].to_numpy()
    apix = optics.loc[group, "rlnImagePixelSize"].to_numpy()
    cs = optics.loc[group, "rlnSphericalAberration"].to_numpy()
    ctf = parse_ctf(path)
    np.testing.assert_allclose(ctf[:, 1], apix, rtol=1e-6)
    np.testing.assert_allclose(ctf[:, 6], cs, rtol=1e-6)
    assert len(np.unique(ctf[:, 1])) == 2  # the groups differ, so a wrong merge shows
    _, trans = parse_poses(path, None)
    origins = star.particles[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    np.testing.assert_allclose(trans, origins / apix[:, None] / 196, rtol=1e-6)
    # a global --apix overrides every group
    _, trans_override = parse_poses(path, 196, apix=1.0)
    np.testing.assert_allclose(trans_override, origins / 196, rtol=1e-6)


@needs_fixtures
def test_relion5():
    path = FIXTURES / "relion5.star"
    p = read_star(path).particles
    rots, trans = parse_poses(path, None)
    assert rots.shape == (17, 3, 3)
    np.testing.assert_allclose(trans, p[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / 0.89 / 448, rtol=1e-6)
    ctf = parse_ctf(path)
    np.testing.assert_allclose(ctf[0, [0, 1, 5, 6, 7, 8]], [448, 0.89, 100, 1.6, 0.1, 0], rtol=1e-6)


@needs_fixtures
def test_toy_projections_relion30_without_pixel_size():
    path = FIXTURES / "toy_projections.star"
    with pytest.raises(FormatError, match=r"no box size \(_rlnImageSize\).*-D"):
        parse_ctf(path, apix=1.5)
    with pytest.raises(FormatError, match="no pixel size.*--apix"):
        parse_ctf(path, D=30)
    ctf = parse_ctf(path, D=30, apix=1.5)
    assert ctf.shape == (1000, 9)
    np.testing.assert_allclose(ctf[0], [30, 1.5, 0, 0, 0, 300, 0.001, 0.1, 90], rtol=1e-6)
    with pytest.raises(FormatError, match="_rlnAngleRot"):
        parse_poses(path, 30)


@needs_fixtures
def test_empiar_star_and_cs_agree():
    star_ctf = parse_ctf(FIXTURES / "empiar_10076_7.star", D=320)
    cs_ctf = parse_ctf(FIXTURES / "empiar_10076_7.cs")
    np.testing.assert_allclose(star_ctf, cs_ctf, rtol=1e-6)
    np.testing.assert_allclose(star_ctf[0, 1], 5 * 1e4 / 38168, rtol=1e-6)  # detector px (um) / magnification


@needs_fixtures
def test_missing_values_and_overrides():
    with pytest.raises(FormatError, match="_rlnAmplitudeContrast.*-w"):
        parse_ctf(PFCRT, D=300)
    ctf = parse_ctf(PFCRT, D=128, apix=2.0, kv=200, cs=2.7, w=0.07, ps=45)
    np.testing.assert_allclose(ctf[:, [0, 1, 5, 6, 7, 8]], [[128, 2.0, 200, 2.7, 0.07, 45]] * 5, rtol=1e-6)
    ctf = parse_ctf(P12, D=90, apix=1.0, kv=300, cs=0.0, w=0.1, ps=10)
    np.testing.assert_allclose(ctf[:, [0, 1, 5, 6, 7, 8]], [[90, 1.0, 300, 0, 0.1, 10]] * 2019, rtol=1e-6)


@needs_fixtures
def test_cryosparc_2d_only_is_a_clear_error():
    with pytest.raises(FormatError, match=r"has no 3D alignments \(alignments3D/pose\); export from a 3D refinement"):
        parse_poses(FIXTURES / "cryosparc_J2_particles_exported.cs", None)


def test_cs_phase_shift_in_degrees(tmp_path):
    arr = np.zeros(2, dtype=[("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4"), ("ctf/accel_kv", "<f4"),
                             ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"),
                             ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4")])
    arr["blob/shape"] = 64
    arr["blob/psize_A"] = 1.5
    arr["ctf/df_angle_rad"] = [np.pi / 2, -np.pi / 4]
    arr["ctf/phase_shift_rad"] = [np.pi / 2, np.pi]
    write_cs(tmp_path / "x.cs", arr)
    ctf = parse_ctf(tmp_path / "x.cs")
    np.testing.assert_allclose(ctf[:, 4], [90, -45], rtol=1e-6)
    np.testing.assert_allclose(ctf[:, 8], [90, 180], rtol=1e-6)
    with pytest.raises(FormatError, match="alignments3D/pose"):
        parse_poses(tmp_path / "x.cs", None)


def test_missing_star_columns(tmp_path):
    write_star(tmp_path / "a.star", pd.DataFrame({"rlnImageName": ["1@a.mrcs"], "rlnAngleRot": [0.0]}))
    with pytest.raises(FormatError, match="_rlnAngleTilt"):
        parse_poses(tmp_path / "a.star", 64)
    with pytest.raises(FormatError, match="_rlnDefocusU"):
        parse_ctf(tmp_path / "a.star", D=64, apix=1, kv=300, cs=2.7, w=0.1)


def test_origin_in_angstrom_needs_pixel_size(tmp_path):
    particles = pd.DataFrame({"rlnImageName": ["1@a.mrcs"], "rlnAngleRot": [0.0], "rlnAngleTilt": [0.0],
                              "rlnAnglePsi": [0.0], "rlnOriginXAngst": [3.0], "rlnOriginYAngst": [-6.0],
                              "rlnOpticsGroup": [1]})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnImageSize": [64]})
    write_star(tmp_path / "a.star", particles, optics)
    with pytest.raises(FormatError, match="no pixel size"):
        parse_poses(tmp_path / "a.star", None)
    _, trans = parse_poses(tmp_path / "a.star", None, apix=1.5)
    np.testing.assert_allclose(trans, [[2 / 64, -4 / 64]])


def test_unknown_extension(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(FormatError, match="unknown pose file type '.txt'"):
        parse_poses(tmp_path / "x.txt", 64)
    with pytest.raises(FormatError, match="unknown CTF file type"):
        parse_ctf(tmp_path / "x.txt")


# ----- conventions and round trips -----

def test_euler_to_rot_convention():
    # RELION's matrix for rot alone is a rotation of the axes about z: first row (cos, sin, 0)
    a = np.deg2rad(30)
    np.testing.assert_allclose(euler_to_rot([[30, 0, 0]])[0],
                               [[np.cos(a), np.sin(a), 0], [-np.sin(a), np.cos(a), 0], [0, 0, 1]], atol=1e-12)
    # tilt about y: third row is (sin tilt, 0, cos tilt)
    b = np.deg2rad(40)
    np.testing.assert_allclose(euler_to_rot([[0, 40, 0]])[0],
                               [[np.cos(b), 0, -np.sin(b)], [0, 1, 0], [np.sin(b), 0, np.cos(b)]], atol=1e-12)
    # composition A = Rz(psi) Ry(tilt) Rz(rot)
    A = euler_to_rot([[30, 40, 50]])[0]
    np.testing.assert_allclose(A, euler_to_rot([[50, 0, 0]])[0] @ euler_to_rot([[0, 40, 0]])[0]
                               @ euler_to_rot([[30, 0, 0]])[0], atol=1e-12)


def test_euler_round_trip():
    R = _random_rots(2000)
    eul = rot_to_euler(R)
    assert (eul[:, 1] >= 0).all() and (eul[:, 1] <= 180).all()
    np.testing.assert_allclose(euler_to_rot(eul), R, atol=1e-10)
    angles = np.array([[10, 20, 30], [-170, 90, 179], [45, 179.5, -60]])
    np.testing.assert_allclose(rot_to_euler(euler_to_rot(angles)), angles, atol=1e-9)


def test_euler_round_trip_gimbal_lock():
    angles = np.array([[30, 0, 20], [30, 180, 20], [-100, 0, 0]])
    R = euler_to_rot(angles)
    np.testing.assert_allclose(euler_to_rot(rot_to_euler(R)), R, atol=1e-10)


def test_axis_angle_round_trip():
    R = _random_rots(2000, seed=1)
    v = rot_to_axis_angle(R)
    assert (np.linalg.norm(v, axis=1) <= np.pi + 1e-9).all()
    np.testing.assert_allclose(axis_angle_to_rot(v), R, atol=1e-10)
    # identity, a half turn (the log map's hard case) and a small angle
    special = np.array([[0, 0, 0], [np.pi, 0, 0], [0, np.pi / np.sqrt(2), np.pi / np.sqrt(2)], [1e-9, 0, 0]])
    Rs = axis_angle_to_rot(special)
    np.testing.assert_allclose(axis_angle_to_rot(rot_to_axis_angle(Rs)), Rs, atol=1e-10)
    np.testing.assert_allclose(Rs[0], np.eye(3))
    # active rotation: a quarter turn about z takes x to y
    np.testing.assert_allclose(axis_angle_to_rot([[0, 0, np.pi / 2]])[0] @ [1, 0, 0], [0, 1, 0], atol=1e-12)


@needs_fixtures
def test_parse_save_load_round_trip(tmp_path):
    rots, trans = parse_poses(P12, None)
    save_poses(tmp_path / "poses.pkl", rots, trans)
    r2, t2 = load_poses(tmp_path / "poses.pkl")
    np.testing.assert_array_equal(r2, rots)
    np.testing.assert_array_equal(t2, trans)
    # cryoDRGN's pickles load too
    r3, t3 = load_poses(FIXTURES / "pose.star.pkl")
    assert r3.dtype == np.float32 and r3.shape == (5, 3, 3)
    ctf = parse_ctf(P12)
    save_ctf(tmp_path / "ctf.pkl", ctf)
    np.testing.assert_array_equal(load_ctf(tmp_path / "ctf.pkl"), ctf)
    with open(tmp_path / "ctf.pkl", "rb") as f:
        raw = pickle.load(f)
    assert isinstance(raw, np.ndarray) and raw.dtype == np.float32
    np.testing.assert_array_equal(load_ctf(FIXTURES / "ctf1.pkl"), _pickle("ctf1.pkl"))


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return path


def test_load_poses_errors(tmp_path):
    good = _random_rots(4).astype(np.float32)
    with pytest.raises(FormatError, match="no such file"):
        load_poses(tmp_path / "none.pkl")
    (tmp_path / "junk.pkl").write_text("junk")
    with pytest.raises(FormatError, match="not a pickle"):
        load_poses(tmp_path / "junk.pkl")
    with pytest.raises(FormatError, match=r"\(rots, trans\) pair"):
        load_poses(_dump(tmp_path / "a.pkl", good))
    with pytest.raises(FormatError, match=r"expected \(N, 3, 3\)"):
        load_poses(_dump(tmp_path / "b.pkl", (good[:, :2], np.zeros((4, 2)))))
    with pytest.raises(FormatError, match=r"expected \(N, 2\)"):
        load_poses(_dump(tmp_path / "c.pkl", (good, np.zeros((4, 3)))))
    with pytest.raises(FormatError, match="4 rotations but 3 translations"):
        load_poses(_dump(tmp_path / "d.pkl", (good, np.zeros((3, 2)))))
    with pytest.raises(FormatError, match="not proper rotation"):
        load_poses(_dump(tmp_path / "e.pkl", (2 * good, np.zeros((4, 2)))))
    with pytest.raises(FormatError, match="not proper rotation"):
        load_poses(_dump(tmp_path / "f.pkl", (-good, np.zeros((4, 2)))))  # reflections
    bad = np.zeros((4, 2))
    bad[1, 0] = np.nan
    with pytest.raises(FormatError, match="non-finite"):
        load_poses(_dump(tmp_path / "g.pkl", (good, bad)))


def test_load_ctf_errors(tmp_path):
    with pytest.raises(FormatError, match=r"expected \(N, 9\)"):
        load_ctf(_dump(tmp_path / "a.pkl", np.zeros((3, 8), dtype=np.float32)))
    with pytest.raises(FormatError, match="got tuple"):
        load_ctf(_dump(tmp_path / "b.pkl", (np.zeros((3, 9)),)))
    bad = np.ones((3, 9))
    bad[2, 4] = np.inf
    with pytest.raises(FormatError, match="row 2"):
        load_ctf(_dump(tmp_path / "c.pkl", bad))
    with pytest.raises(FormatError, match="positive"):
        load_ctf(_dump(tmp_path / "d.pkl", np.zeros((3, 9))))


def test_index_files_round_trip_and_validate(tmp_path):
    from distdrgn.formats.ind import load_indices, save_indices

    path = tmp_path / "ind.pkl"
    save_indices(path, [4, 0, 2])
    assert load_indices(path, 5).tolist() == [4, 0, 2]
    assert load_indices(np.array([1, 3]), 5).dtype == np.int64
    with pytest.raises(FormatError, match=r"in \[0, 3\)"):
        load_indices(path, 3)
    with pytest.raises(FormatError, match="integer indices"):
        load_indices(np.array([0.5]), 3)
    with pytest.raises(FormatError, match="no such file"):
        load_indices(tmp_path / "missing.pkl", 3)
