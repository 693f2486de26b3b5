"""``distdrgn backproject`` and ``distdrgn fsc`` on a simulated homogeneous dataset."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from distdrgn import cli
from distdrgn.analysis.reconstruct import backproject_store, masked_fsc
from distdrgn.errors import DistdrgnError
from distdrgn.formats.mrc import read_volume, write_mrc
from distdrgn.projection import backproject, fsc

D = 16
N = 400


@pytest.fixture(scope="module")
def homogeneous(tmp_path_factory):
    """400 noiseless images of one state, stored in chunks of 48 images (9 chunks)."""
    from distdrgn.simulate import load_ground_truth, simulate
    from distdrgn.store import ingest

    root = tmp_path_factory.mktemp("homog")
    paths = simulate(root / "sim", n=N, D=D, snr=float("inf"), dist="homogeneous", seed=3, progress=False,
                     write_volumes=False)
    store = ingest(paths["particles.mrcs"], root / "store", poses=paths["poses.pkl"], ctf=paths["ctf.pkl"],
                   progress=False, layout_overrides={"target_chunk_bytes": D * D * 4 * 48})
    gt = load_ground_truth(root / "sim").image_volume(0)
    return {"root": root, "store": Path(store), "gt": gt, **paths}


def corr(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_backproject_cli_writes_map_and_half_maps(homogeneous, tmp_path):
    out = tmp_path / "vol.mrc"
    code = cli.main(["backproject", str(homogeneous["store"]), "-o", str(out), "--no-progress"])
    assert code == 0
    vol, apix = read_volume(out)
    h1, _ = read_volume(tmp_path / "vol_half1.mrc")
    h2, _ = read_volume(tmp_path / "vol_half2.mrc")
    assert vol.shape == h1.shape == h2.shape == (D, D, D)
    assert apix == pytest.approx(192 / D, rel=1e-5)
    # the CTF-weighted, inverted back-projection recovers the positive ground-truth density
    assert corr(vol, homogeneous["gt"]) > 0.8
    assert corr(h1, h2) > 0.8
    _freqs, curve = fsc(h1, h2)
    assert curve[1:4].min() > 0.9


def test_full_map_equals_direct_backprojection_and_halves_split_even_odd(homogeneous):
    from distdrgn.store.reader import ParticleStore

    store = ParticleStore.open(homogeneous["store"])
    ind = np.arange(5, 300, 3)
    rec = backproject_store(homogeneous["store"], ind=ind, first=60, progress=False)
    pos = ind[:60]
    np.testing.assert_array_equal(rec.positions, pos)
    rots, trans = store.poses
    imgs = -store.images(pos)
    ref = backproject(imgs, rots[pos], trans[pos], store.ctf[pos]).numpy()
    np.testing.assert_allclose(rec.volume, ref, atol=1e-5 * np.abs(ref).max())
    half2 = backproject(imgs[1::2], rots[pos[1::2]], trans[pos[1::2]], store.ctf[pos[1::2]]).numpy()
    np.testing.assert_allclose(rec.half2, half2, atol=1e-5 * np.abs(half2).max())
    # without inversion the map is the negative density
    flipped = backproject_store(homogeneous["store"], ind=ind, first=60, invert=False, half_maps=False,
                                progress=False)
    assert flipped.half1 is None
    np.testing.assert_allclose(flipped.volume, -rec.volume, atol=1e-5 * np.abs(ref).max())


def test_backproject_cli_with_ind_and_errors(homogeneous, tmp_path, capsys):
    ind_file = tmp_path / "ind.pkl"
    with open(ind_file, "wb") as f:
        pickle.dump(np.arange(0, N, 2, dtype=np.int64), f)
    out = tmp_path / "sub.mrc"
    assert cli.main(["backproject", str(homogeneous["store"]), "--ind", str(ind_file), "--first", "50",
                     "--no-half-maps", "-o", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "back-projected 50 particles" in text and "FSC" not in text
    assert not (tmp_path / "sub_half1.mrc").exists()
    assert cli.main(["backproject", str(homogeneous["store"]), "-o", str(tmp_path / "v.map")]) == 2
    assert cli.main(["backproject", str(tmp_path / "nope.zarr"), "-o", str(tmp_path / "v.mrc")]) == 2
    with pytest.raises(DistdrgnError, match="half-maps need at least 2"):
        backproject_store(homogeneous["store"], first=1, progress=False)


def test_fsc_cli_resolutions_plot_and_text(homogeneous, tmp_path, capsys):
    gt = homogeneous["gt"]
    apix = 2.0
    a, b = tmp_path / "a.mrc", tmp_path / "b.mrc"
    write_mrc(a, gt, apix, is_volume=True)
    write_mrc(b, gt, apix, is_volume=True)
    assert cli.main(["fsc", str(a), str(b)]) == 0
    # identical maps correlate to Nyquist: 0.5 1/px = 2 * apix
    assert capsys.readouterr().out.strip() == "FSC=0.5: 0.5000 1/px = 4.00 A; FSC=0.143: 0.5000 1/px = 4.00 A"
    # a low-passed copy: the curve falls where the filter cuts
    f = np.fft.fftshift(np.fft.fftn(gt))
    k = np.arange(D) - D // 2
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    noise = np.random.default_rng(0).normal(size=f.shape) * np.abs(f).mean() * (r > 4)
    lowpassed = np.fft.ifftn(np.fft.ifftshift(f * (r <= 4) + noise)).real.astype(np.float32)
    write_mrc(b, lowpassed, apix, is_volume=True)
    txt, png = tmp_path / "fsc.txt", tmp_path / "fsc.png"
    assert cli.main(["fsc", str(a), str(b), "--plot", str(png), "-o", str(txt)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    freqs, curve = masked_fsc(gt, lowpassed)
    data = np.loadtxt(txt)
    np.testing.assert_allclose(data[:, 0], freqs)
    np.testing.assert_allclose(data[:, 1], freqs / apix)
    np.testing.assert_allclose(data[:, 2], curve, atol=1e-5)
    assert np.all(curve[:4] > 0.99) and curve[6] < 0.5
    res05 = float(line.split("FSC=0.5: ")[1].split(" 1/px")[0])
    assert 4 / D <= res05 <= 6 / D
    assert png.stat().st_size > 1000
    # the header voxel size is overridden by --apix; a mask multiplies both maps
    mask = tmp_path / "mask.mrc"
    write_mrc(mask, np.ones_like(gt), apix, is_volume=True)
    assert cli.main(["fsc", str(a), str(a), "--mask", str(mask), "--apix", "1.5"]) == 0
    assert "= 3.00 A" in capsys.readouterr().out
    small = tmp_path / "small.mrc"
    write_mrc(small, gt[:8, :8, :8], apix, is_volume=True)
    assert cli.main(["fsc", str(a), str(small)]) == 2


# ---- one-line errors for bad values and unusable outputs (issue 16, item 3) ------------------------------


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_metrics_port_out_of_range_is_a_config_error(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from distdrgn.config import load_config

    for bad in ("99999", "0", "-1", "65536"):
        with pytest.raises(DistdrgnError, match=r"metrics\.port must be null or in 1\.\.65535"):
            load_config(None, [f"metrics.port={bad}"])
    assert load_config(None, ["metrics.port=65535"]).metrics.port == 65535
    assert load_config(None, ["metrics.port=null"]).metrics.port is None
    default = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    assert cli.main(["train", str(default), "data.store=none.zarr", "output.dir=none", "metrics.port=99999"]) == 2
    assert "metrics.port must be null or in 1..65535, got 99999" in _one_error_line(capsys)


def _bad_star(tmp_path: Path, column: str = "rlnDefocusU", value: str = "abc", row: int = 2) -> Path:
    """A RELION 3.0 star of 4 particles of the stack s.mrcs whose ``column`` holds ``value`` in ``row``."""
    cols = {"rlnImageName": [f"{i + 1:06d}@s.mrcs" for i in range(4)],
            "rlnDefocusU": ["15000.0"] * 4, "rlnDefocusV": ["14000.0"] * 4, "rlnDefocusAngle": ["10.0"] * 4,
            "rlnVoltage": ["300"] * 4, "rlnSphericalAberration": ["2.7"] * 4, "rlnAmplitudeContrast": ["0.1"] * 4,
            "rlnAngleRot": ["10"] * 4, "rlnAngleTilt": ["20"] * 4, "rlnAnglePsi": ["30"] * 4,
            "rlnOriginX": ["1.5"] * 4, "rlnOriginY": ["-2"] * 4, "rlnImagePixelSize": ["2.0"] * 4}
    cols[column][row] = value
    lines = ["data_", "", "loop_"] + [f"_{c} #{i + 1}" for i, c in enumerate(cols)]
    lines += [" ".join(cols[c][i] for c in cols) for i in range(4)]
    path = tmp_path / "bad.star"
    path.write_text("\n".join(lines) + "\n")
    write_mrc(tmp_path / "s.mrcs", np.zeros((4, 8, 8), np.float32), apix=2.0)
    return path


@pytest.mark.parametrize("command,column", [("parse-ctf", "rlnDefocusU"), ("parse-ctf", "rlnVoltage"),
                                            ("parse-poses", "rlnAngleTilt"), ("parse-poses", "rlnOriginY")])
def test_non_numeric_star_value_is_a_one_line_error(tmp_path, capsys, command, column):
    star = _bad_star(tmp_path, column, "abc", row=2)
    assert cli.main([command, str(star), "-D", "8", "-o", str(tmp_path / "out.pkl")]) == 2
    err = _one_error_line(capsys)
    assert str(star) in err and f"_{column}" in err and "row 2" in err and "'abc'" in err, err
    assert not (tmp_path / "out.pkl").exists()


def test_non_numeric_star_value_in_ingest_is_a_one_line_error(tmp_path, capsys):
    star = _bad_star(tmp_path, "rlnDefocusV", "1.2.3", row=1)
    assert cli.main(["ingest", str(star), "-o", str(tmp_path / "store.zarr"), "--no-progress"]) == 2
    err = _one_error_line(capsys)
    assert str(star) in err and "_rlnDefocusV" in err and "row 1" in err and "'1.2.3'" in err, err


def _z_file(tmp_path: Path, n: int = 50) -> Path:
    from distdrgn.checkpoint import save_z

    z = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    save_z(tmp_path / "z.pkl", z, np.full_like(z, -2.0))
    return tmp_path / "z.pkl"


def test_select_output_that_is_a_directory_or_missing_dir_is_a_one_line_error(tmp_path, capsys):
    z = _z_file(tmp_path)
    (tmp_path / "adir").mkdir()
    assert cli.main(["select", str(z), "--z-norm-above", "0", "-o", str(tmp_path / "adir")]) == 2
    assert str(tmp_path / "adir") in _one_error_line(capsys)
    assert cli.main(["select", str(z), "--z-norm-above", "0", "-o", str(tmp_path / "no" / "ind.pkl")]) == 2
    assert "does not exist" in _one_error_line(capsys)
    (tmp_path / "afile").write_text("x")
    assert cli.main(["select", str(z), "--z-norm-above", "0", "-o", str(tmp_path / "afile" / "ind.pkl")]) == 2
    assert str(tmp_path / "afile") in _one_error_line(capsys)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only directories, so there is no permission error to report")
def test_select_into_read_only_directory_is_a_one_line_error(tmp_path, capsys):
    z = _z_file(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert cli.main(["select", str(z), "--z-norm-above", "0", "-o", str(ro / "ind.pkl")]) == 2
        err = _one_error_line(capsys)
        assert str(ro) in err and "not writable" in err
    finally:
        ro.chmod(0o755)


def test_select_write_failure_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """An OSError while writing (e.g. a full disk, or permissions root ignores in the check) names the path."""
    import distdrgn.formats.ind as ind

    def fail(path, _ind):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ind, "save_indices", fail)
    z = _z_file(tmp_path)
    assert cli.main(["select", str(z), "--z-norm-above", "0", "-o", str(tmp_path / "ind.pkl")]) == 2
    err = _one_error_line(capsys)
    assert str(tmp_path / "ind.pkl") in err and "Permission denied" in err


def _latent_run(tmp_path: Path) -> Path:
    from test_analyze import make_run

    return make_run(tmp_path / "run", zdim=2, n=60, epochs=1)


def test_analyze_output_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    run = _latent_run(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["analyze", str(run), "--no-volumes", "--no-umap", "-o", str(afile)]) == 2
    err = _one_error_line(capsys)
    assert str(afile) in err and "file" in err
    assert cli.main(["analyze", str(run), "--no-volumes", "--no-umap", "-o", str(afile / "sub")]) == 2
    assert str(afile / "sub") in _one_error_line(capsys)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only directories, so there is no permission error to report")
def test_analyze_into_read_only_directory_is_a_one_line_error(tmp_path, capsys):
    run = _latent_run(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert cli.main(["analyze", str(run), "--no-volumes", "--no-umap", "-o", str(ro)]) == 2
        assert str(ro) in _one_error_line(capsys)
        assert cli.main(["analyze", str(run), "--no-volumes", "--no-umap", "-o", str(ro / "sub")]) == 2
        assert str(ro / "sub") in _one_error_line(capsys)
    finally:
        ro.chmod(0o755)


def test_analyze_z_with_another_particle_count_is_refused(tmp_path, capsys):
    from distdrgn.checkpoint import save_z

    run = _latent_run(tmp_path)  # trained on a store of 60 particles (its checkpoint says so)
    z = np.random.default_rng(0).normal(size=(59, 2)).astype(np.float32)
    save_z(run / "z.pkl", z, np.zeros_like(z))
    out = tmp_path / "analysis"
    assert cli.main(["analyze", str(run), "--no-volumes", "--no-umap", "-o", str(out)]) == 2
    err = _one_error_line(capsys)
    assert f"{run / 'z.pkl'}: 59 rows of latents, but the run was trained on 60 particles (the store none)" in err
    assert "belongs to another run or dataset" in err and not out.exists()


def test_eval_vol_refuses_non_finite_latents_naming_the_rows(tmp_path, capsys):
    run = _latent_run(tmp_path)
    zfile = tmp_path / "z.txt"
    zfile.write_text("0 0\n1 nan\n0.5 0.5\ninf 2\n")
    out = tmp_path / "vols"
    assert cli.main(["eval-vol", str(run), "--zfile", str(zfile), "-o", str(out), "--device", "cpu"]) == 2
    assert _one_error_line(capsys) == f"error: {zfile}: non-finite (NaN or inf) latents in row(s) 1, 3 (numbered from 0)"
    assert not out.exists()


@pytest.mark.parametrize("option,message", [(["-D", "33"], "-D 33: the volume box must be even and >= 4"),
                                            (["--crop", "7"], "--crop 7 must be even, positive and <= the volume box")])
def test_eval_vol_bad_box_leaves_no_output_folder(tmp_path, capsys, option, message):
    run = _latent_run(tmp_path)
    out = tmp_path / "vols"
    assert cli.main(["eval-vol", str(run), "-z", "0", "0", "-o", str(out), "--device", "cpu", *option]) == 2
    assert message in _one_error_line(capsys) and not out.exists()


def test_eval_vol_output_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    run = _latent_run(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["eval-vol", str(run), "-z", "0", "0", "-o", str(afile), "--device", "cpu"]) == 2
    assert _one_error_line(capsys) == f"error: {afile}: output directory exists as a file"
    assert cli.main(["eval-vol", str(run), "-z", "0", "0", "-o", str(afile / "sub"), "--device", "cpu"]) == 2
    assert str(afile / "sub") in _one_error_line(capsys) and afile.read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only directories, so there is no permission error to report")
def test_eval_vol_into_read_only_directory_is_a_one_line_error(tmp_path, capsys):
    run = _latent_run(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert cli.main(["eval-vol", str(run), "-z", "0", "0", "-o", str(ro / "vols"), "--device", "cpu"]) == 2
        assert "is not writable" in _one_error_line(capsys) and not any(ro.iterdir())
    finally:
        ro.chmod(0o755)
