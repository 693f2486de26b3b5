"""The simulator with ground truth (distdrgn.simulate, distdrgn.atoms, `distdrgn simulate`)."""

import json
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from distdrgn.atoms import pseudo_atomic_model, gaussian_ft, model_volume, sigma_px, slice_ft
from distdrgn.cli import main as cli_main
from distdrgn.fft import fft3_center
from distdrgn.formats.ctf_params import load_ctf, parse_ctf
from distdrgn.formats.mrc import open_mrc, read_volume
from distdrgn.formats.poses import load_poses, parse_poses
from distdrgn.projection import backproject, fsc
from distdrgn.simulate import (
    DISTRIBUTIONS,
    clean_images,
    draw_states,
    ground_truth_volume,
    load_ground_truth,
    random_rotations,
    simulate,
)


@pytest.mark.parametrize("D", [32, 48])
def test_rendered_volume_matches_analytic_transform(D):
    """The centred 3D DFT of the rendered volume equals the analytic transform at lattice points."""
    model = pseudo_atomic_model(0)
    vol = model_volume(model, 0.7, True, D).double()
    k = (torch.arange(D, dtype=torch.float64) - D // 2) / D
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    # Every lattice point up to |k| = 0.1, plus a random sample of the rest (keeps the test fast).
    q_all = torch.stack([kx, ky, kz], -1).reshape(-1, 3)
    low = q_all.norm(dim=1) <= 0.1
    pick = torch.randperm(D**3, generator=torch.Generator().manual_seed(0))[:6000]
    sel = torch.nonzero(low).squeeze(1).tolist() + pick.tolist()
    q = q_all[sel][None]
    pos, w = model.atoms(torch.tensor([0.7]), torch.tensor([True]), D, dtype=torch.float64)
    analytic = gaussian_ft(q, pos, w, sigma_px(D))[0]
    numeric = fft3_center(vol).reshape(-1)[sel]
    scale = analytic.abs().max()
    assert ((numeric - analytic).abs().max() / scale) < 2e-3
    # A half-voxel offset (a wrong centre convention) would be far off.
    shifted = gaussian_ft(q, pos + 0.5, w, sigma_px(D))[0]
    assert ((numeric - shifted).abs().max() / scale) > 0.1


def test_slice_ft_is_the_central_slice():
    """slice_ft (separable matrix product) = gaussian_ft at [k_x, k_y, 0] @ R."""
    D = 16
    model = pseudo_atomic_model(0)
    rots = random_rotations(3, torch.Generator().manual_seed(0))
    pos, w = model.atoms(torch.tensor([0.2, 0.5, 1.0]), torch.tensor([True, False, True]), D, dtype=torch.float64)
    kx = torch.fft.rfftfreq(D, dtype=torch.float64)
    ky = torch.fft.fftfreq(D, dtype=torch.float64)
    gy, gx = torch.meshgrid(ky, kx, indexing="ij")
    coords = torch.stack([gx.ravel(), gy.ravel(), torch.zeros(gx.numel(), dtype=torch.float64)], -1)
    expected = gaussian_ft(coords @ rots, pos, w, sigma_px(D))
    got = slice_ft(kx, ky, rots, pos, w, sigma_px(D)).reshape(3, -1)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


def test_model_has_conformational_and_compositional_change():
    D = 32
    ref = ground_truth_volume(0.0, True, D)
    closed = ground_truth_volume(1.0, True, D)
    bare = ground_truth_volume(0.0, False, D)
    assert np.abs(closed - ref).sum() > 0.2 * np.abs(ref).sum()
    assert 0.05 * ref.sum() < (ref - bare).sum() < 0.3 * ref.sum()  # the subunit is a minority of the mass
    assert np.isclose(ref.sum(), closed.sum(), rtol=1e-3)  # a rigid motion keeps the mass
    # The particle fills about 60% of the box and stays inside the 0.85 window radius.
    for c in (0.0, 1.0):
        pos, _ = pseudo_atomic_model(0).atoms(torch.tensor([c]), torch.tensor([True]), 1)
        r = pos[0].norm(dim=1)
        assert 0.27 < float(r.max()) < 0.38
        assert float((pos[0].max(0).values - pos[0].min(0).values).max()) > 0.45


def test_state_distributions():
    gen = torch.Generator().manual_seed(0)
    n = 4000
    c, sub, state = draw_states(n, "uniform", 5, gen)
    assert 0.45 < sub.mean() < 0.55 and c.min() >= 0 and c.max() <= 1
    assert abs(np.corrcoef(c, sub)[0, 1]) < 0.1
    assert np.array_equal(state, np.minimum((c * 5).astype(int), 4))
    c, sub, state = draw_states(n, "cooperative", 5, gen)
    assert np.array_equal(sub, c >= 0.5)
    c, sub, state = draw_states(n, "discrete", 5, gen)
    assert set(np.unique(c)) == {0.0, 0.25, 0.5, 0.75, 1.0}
    np.testing.assert_allclose(c, state / 4)
    assert 0.45 < sub.mean() < 0.55
    c, sub, state = draw_states(10, "homogeneous", 5, gen)
    assert np.all(c == 0.5) and np.all(sub)
    assert set(DISTRIBUTIONS) == {"uniform", "cooperative", "discrete", "homogeneous"}


@pytest.fixture(scope="module")
def homogeneous(tmp_path_factory):
    out = tmp_path_factory.mktemp("homog")
    simulate(out, 1000, 32, 1.0, dist="homogeneous", seed=3, progress=False, write_volumes=False)
    images = open_mrc(out / "particles.mrcs").read(slice(None))
    rots, trans = load_poses(out / "poses.pkl")
    ctf = load_ctf(out / "ctf.pkl")
    return images, rots, trans, ctf, ground_truth_volume(0.5, True, 32)


def test_backprojection_of_simulated_data_matches_ground_truth(homogeneous):
    """THE convention test: the stored poses, CTF and contrast reconstruct the ground truth.

    1000 images, D = 32, SNR 1, CTF-weighted voxel back-projection of the inverted images:
    FSC > 0.9 in every shell up to 0.25 cycles/pixel. Each wrong convention ruins it.
    """
    images, rots, trans, ctf, gt = homogeneous
    data = -images  # the default data inversion of real (white-particle) stacks

    def shells(vol):
        freqs, curve = fsc(vol, gt)
        return curve[(freqs > 0) & (freqs <= 0.25)]

    good = shells(backproject(data, rots, trans, ctf))
    assert good.min() > 0.9, good
    neg_shift = shells(backproject(data, rots, -trans, ctf))
    assert neg_shift[-4:].max() < 0.5, neg_shift  # shells 0.16..0.25 cycles/pixel
    transposed = shells(backproject(data, rots.transpose(0, 2, 1), trans, ctf))
    # R^T = R for rotations by ~180 degrees (common under uniform SO(3)), so part of the data
    # still lands in the right place: the curve drops but not to zero.
    assert transposed[-1] < 0.75 and transposed[-4:].mean() < 0.8, transposed
    swapped_xy = shells(backproject(data.transpose(0, 2, 1), rots, trans[:, ::-1].copy(), ctf))
    assert swapped_xy[-4:].max() < 0.5, swapped_xy  # a mirrored (wrong-hand) image convention
    not_inverted = shells(backproject(images, rots, trans, ctf))
    assert not_inverted.max() < -0.9, not_inverted  # stacks are written with white particles


def test_snr_definition_and_reproducibility(tmp_path):
    kw = dict(dist="uniform", seed=11, progress=False, write_volumes=False, batch_size=16)
    noisy = simulate(tmp_path / "a", 48, 16, 0.5, **kw)
    clean = simulate(tmp_path / "b", 48, 16, math.inf, **kw)
    again = simulate(tmp_path / "c", 48, 16, 0.5, **kw)
    a = open_mrc(noisy["particles.mrcs"]).read(slice(None)).astype(np.float64)
    b = open_mrc(clean["particles.mrcs"]).read(slice(None)).astype(np.float64)
    assert np.array_equal(a, open_mrc(again["particles.mrcs"]).read(slice(None)))
    info = json.loads(noisy["simulation.json"].read_text())
    noise = a - b
    assert noise.std() == pytest.approx(info["noise_std"], rel=0.05)
    assert b.var(axis=(1, 2)).mean() / noise.var() == pytest.approx(0.5, rel=0.15)
    # The clean images are minus the analytic CTF-modulated projections.
    rots, trans = load_poses(noisy["poses.pkl"])
    gt = load_ground_truth(tmp_path / "a")
    expected = clean_images(pseudo_atomic_model(0), 16, torch.from_numpy(rots), torch.from_numpy(trans),
                            torch.from_numpy(load_ctf(noisy["ctf.pkl"])), torch.from_numpy(gt.c.astype(np.float64)),
                            torch.from_numpy(gt.subunit))  # fmt: skip
    np.testing.assert_allclose(b, -expected.numpy(), atol=1e-4 * np.abs(b).max())


def test_cli_writes_every_output(tmp_path):
    out = tmp_path / "sim"
    rc = cli_main(["simulate", str(out), "--n", "40", "-D", "16", "--snr", "2", "--dist", "cooperative",
                   "--apix", "4.5", "--seed", "5", "--batch-size", "16"])  # fmt: skip
    assert rc == 0
    for name in ("particles.mrcs", "particles.star", "poses.pkl", "ctf.pkl", "labels.pkl", "ground_truth.pkl",
                 "simulation.json", "volumes/index.json"):  # fmt: skip
        assert (out / name).is_file(), name
    stack = open_mrc(out / "particles.mrcs")
    assert (stack.n, stack.D) == (40, 16) and stack.apix == pytest.approx(4.5)
    rots, trans = load_poses(out / "poses.pkl")
    ctf = load_ctf(out / "ctf.pkl")
    assert ctf.shape == (40, 9) and np.all(ctf[:, 0] == 16) and np.allclose(ctf[:, 1], 4.5)
    assert np.all((ctf[:, 2] >= 1e4) & (ctf[:, 2] <= 2.5e4)) and np.all(ctf[:, 3] <= ctf[:, 2])
    assert np.all(ctf[:, 3] >= 0.9 * ctf[:, 2]) and np.allclose(ctf[:, 5:8], [300, 2.7, 0.1])
    # The star file parses back (RELION 3.1 optics, origins in Angstrom) to the same poses and CTF.
    srots, strans = parse_poses(out / "particles.star", D=None)
    np.testing.assert_allclose(srots, rots, atol=1e-5)
    np.testing.assert_allclose(strans, trans, atol=1e-6)
    sctf = parse_ctf(out / "particles.star")
    np.testing.assert_allclose(sctf, ctf, rtol=1e-6, atol=1e-3)
    # Ground truth: labels, cooperative coupling, volumes on disk = the API's volumes.
    gt = load_ground_truth(out)
    assert np.array_equal(gt.subunit, gt.c >= 0.5)
    with open(out / "labels.pkl", "rb") as f:
        labels = pickle.load(f)
    assert np.array_equal(labels, 2 * gt.state + gt.subunit)
    index = json.loads((out / "volumes" / "index.json").read_text())
    assert len(index["volumes"]) == 10 and index["apix"] == pytest.approx(4.5)
    entry = index["volumes"][3]
    vol, apix = read_volume(out / "volumes" / entry["file"])
    assert apix == pytest.approx(4.5)
    np.testing.assert_allclose(vol, gt.volume(entry["c"], entry["subunit"]), rtol=1e-6, atol=1e-6)
    info = json.loads((out / "simulation.json").read_text())
    assert info["params"]["n"] == 40 and info["params"]["dist"] == "cooperative" and info["noise_std"] > 0


def test_cli_rejects_bad_arguments(tmp_path):
    res = subprocess.run([sys.executable, "-m", "distdrgn.cli", "simulate", str(tmp_path / "x"), "--n", "4",
                          "-D", "15", "--snr", "1"], capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: -D must be an even box size")


def test_simulate_refuses_to_overwrite_without_force(tmp_path):
    from distdrgn.cli import main

    args = ["simulate", str(tmp_path / "sim"), "--n", "8", "-D", "16", "--snr", "1", "--no-volumes"]
    assert main(args) == 0
    assert main(args) == 2  # a second run into the same folder is refused
    assert main(args + ["--force"]) == 0
