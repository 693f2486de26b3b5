import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np

from distdrgn.cli import main

from fixture_files import FIXTURES, needs_fixtures
REPO = Path(__file__).resolve().parents[1]


def _load(path):
    with open(path, "rb") as f:
        return pickle.load(f)


@needs_fixtures
def test_parse_poses_star_cli(tmp_path, capsys):
    out = tmp_path / "poses.pkl"
    rc = main(["parse-poses", str(FIXTURES / "FinalRefinement-OriginalParticles-PfCRT.star"), "-D", "300",
               "-o", str(out)])
    assert rc == 0
    assert "parsed 5 poses" in capsys.readouterr().out
    rots, trans = _load(out)
    ref_rots, ref_trans = _load(FIXTURES / "pose.star.pkl")
    assert rots.dtype == np.float32
    np.testing.assert_allclose(rots, ref_rots, atol=1e-6)
    np.testing.assert_allclose(trans, ref_trans, rtol=1e-6, atol=1e-9)


@needs_fixtures
def test_parse_poses_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "poses.pkl"
    out.write_bytes(b"keep me")
    args = ["parse-poses", str(FIXTURES / "cryosparc_P12_J24_001_particles.cs"), "-o", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and err.count("\n") == 1
    assert out.read_bytes() == b"keep me"
    assert main(args + ["--force"]) == 0
    rots, trans = _load(out)
    np.testing.assert_allclose(rots, _load(FIXTURES / "pose.cs.pkl")[0], atol=1e-5)


@needs_fixtures
def test_parse_poses_2d_cs_error(tmp_path, capsys):
    rc = main(["parse-poses", str(FIXTURES / "cryosparc_J2_particles_exported.cs"), "-o", str(tmp_path / "p.pkl")])
    assert rc == 2
    assert "has no 3D alignments (alignments3D/pose)" in capsys.readouterr().err
    assert not (tmp_path / "p.pkl").exists()


@needs_fixtures
def test_parse_ctf_cli(tmp_path, capsys):
    out = tmp_path / "ctf.pkl"
    star = str(FIXTURES / "FinalRefinement-OriginalParticles-PfCRT.star")
    assert main(["parse-ctf", star, "-D", "300", "-o", str(out)]) == 2
    assert "_rlnAmplitudeContrast" in capsys.readouterr().err
    assert main(["parse-ctf", star, "-D", "300", "--apix", "1.035", "-w", "0.1", "-o", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "5 particles" in summary and "defocus U 14107 to 16061 A" in summary
    np.testing.assert_allclose(_load(out), _load(FIXTURES / "ctf1.pkl"), rtol=1e-7)


@needs_fixtures
def test_parse_ctf_cs_subprocess(tmp_path):
    out = tmp_path / "ctf.pkl"
    proc = subprocess.run(
        [sys.executable, "-m", "distdrgn.cli", "parse-ctf", str(FIXTURES / "cryosparc_P12_J24_001_particles.cs"),
         "-o", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "2019 particles" in proc.stdout
    ctf = _load(out)
    assert isinstance(ctf, np.ndarray) and ctf.dtype == np.float32
    np.testing.assert_allclose(ctf, _load(FIXTURES / "ctf2.pkl"), rtol=1e-6, atol=1e-5)


def test_missing_input_and_output_folder(tmp_path, capsys):
    assert main(["parse-ctf", str(tmp_path / "none.star"), "-o", str(tmp_path / "c.pkl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["parse-poses", str(tmp_path / "none.star"), "-D", "64", "-o", str(tmp_path / "no" / "p.pkl")]) == 2
    assert "does not exist" in capsys.readouterr().err
