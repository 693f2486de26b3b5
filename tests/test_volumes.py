import subprocess
import sys

import mrcfile
import numpy as np
import pytest
import torch

from distdrgn.checkpoint import load_z
from distdrgn.fft import ht2_center, iht3_center
from distdrgn.lattice import Lattice
from distdrgn.volumes import eval_volume, load_model


@pytest.fixture(scope="module")
def run_dir(small_dataset, tiny_overrides, tmp_path_factory):
    from distdrgn.config import load_config
    from distdrgn.train import train

    run = tmp_path_factory.mktemp("vol") / "run"
    train(load_config(None, tiny_overrides(small_dataset["store"], run, **{"train.epochs": 1})))
    return run


def test_volume_projection_matches_the_decoded_central_slice(run_dir):
    """Projection along z of eval_volume has the 2D Hartley transform of the decoder's slice at R = I."""
    tm = load_model(run_dir)
    D = tm.D
    z = np.array([0.3, -0.2], dtype=np.float32)
    vol = eval_volume(tm, z)
    assert vol.shape == (D, D, D) and vol.dtype == np.float32
    lat = Lattice(D)
    with torch.no_grad():
        slice_ht = tm.model.decoder.slices(lat, torch.eye(3)[None], torch.from_numpy(z)[None])[0] * tm.prep.ht_std
    proj_ht = ht2_center(torch.from_numpy(vol.sum(0)).double())  # (D, D), axes (y, x)
    flat = torch.nn.functional.pad(proj_ht, (0, 1, 0, 1)).flatten()[lat.mask_indices]
    # compare away from the +1/2 edge, where the cropped D^3 volume aliases +1/2 onto -1/2
    jy, jx = lat.mask_indices // (D + 1), lat.mask_indices % (D + 1)
    inner = (jy < D) & (jx < D) & (jy > 0) & (jx > 0)
    torch.testing.assert_close(flat[inner].float(), slice_ht[inner].float(), rtol=1e-3, atol=1e-3 * slice_ht.abs().max().item())


def test_eval_volume_equals_full_lattice_evaluation(run_dir):
    tm = load_model(run_dir)
    D = tm.D
    z = np.array([0.1, 0.5], dtype=np.float32)
    k = (torch.arange(D + 1) - D // 2) / D
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    pts = torch.stack([kx, ky, kz], -1).reshape(1, -1, 3)
    with torch.no_grad():
        h = tm.model.decoder.hartley(pts, torch.from_numpy(z)[None]).reshape(D + 1, D + 1, D + 1)
    h = torch.where((pts[0] ** 2).sum(-1).reshape(h.shape) <= 0.25, h, torch.zeros(()))
    want = iht3_center(h[:-1, :-1, :-1].double() * tm.prep.ht_std).float().numpy()
    np.testing.assert_allclose(eval_volume(tm, z), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert eval_volume(tm, z, D=8).shape == (8, 8, 8)


def test_eval_vol_cli(run_dir, tmp_path):
    out = tmp_path / "vols"
    cmd = [sys.executable, "-m", "distdrgn.cli", "eval-vol", str(run_dir), "-z", "0", "0", "1", "1", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["vol_000.mrc", "vol_001.mrc"]
    tm = load_model(run_dir)
    with mrcfile.open(out / "vol_001.mrc") as mrc:
        data = mrc.data.copy()
        assert float(mrc.voxel_size.x) == pytest.approx(tm.apix)
    np.testing.assert_allclose(data, eval_volume(tm, [1, 1]), rtol=1e-5, atol=1e-5 * np.abs(data).max())
    # --zfile with a z.pkl (first 3 particles' latents are not needed: use a text file), --flip, -D, --apix
    np.savetxt(tmp_path / "z.txt", load_z(run_dir / "z.pkl")[0][:3])
    cmd = [sys.executable, "-m", "distdrgn.cli", "eval-vol", str(run_dir), "--zfile", str(tmp_path / "z.txt"),
           "--flip", "-D", "8", "--apix", "2.5", "-o", str(tmp_path / "v2")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with mrcfile.open(tmp_path / "v2" / "vol_002.mrc") as mrc:
        assert mrc.data.shape == (8, 8, 8) and float(mrc.voxel_size.x) == pytest.approx(2.5)
        z2 = load_z(run_dir / "z.pkl")[0][2]
        np.testing.assert_allclose(mrc.data, eval_volume(tm, z2, D=8)[::-1], rtol=1e-5, atol=1e-6)
    # wrong number of latent values: one-line error, exit 2
    proc = subprocess.run([sys.executable, "-m", "distdrgn.cli", "eval-vol", str(run_dir), "-z", "1", "2", "3",
                           "-o", str(tmp_path / "v3")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: -z: latents must have 2 values")


def test_encode_cli(run_dir, small_dataset, tmp_path):
    out = tmp_path / "z_enc.pkl"
    proc = subprocess.run([sys.executable, "-m", "distdrgn.cli", "encode", str(run_dir), str(small_dataset["store"]),
                           "-o", str(out), "--batch-size", "40"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    mu, logvar = load_z(out)
    ref_mu, ref_lv = load_z(run_dir / "z.pkl")
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logvar, ref_lv, rtol=1e-4, atol=1e-5)
    proc = subprocess.run([sys.executable, "-m", "distdrgn.cli", "encode", str(tmp_path), str(small_dataset["store"]),
                           "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "no weights.pkl" in proc.stderr
