"""Fourier-slice projection, voxel back-projection and FSC (distdrgn.projection)."""

import numpy as np
import pytest
import torch

from distdrgn.atoms import pseudo_atomic_model, model_volume
from distdrgn.fft import ht2_center, symmetrize_ht
from distdrgn.lattice import Lattice, translate_ht
from distdrgn.projection import backproject, fsc, fsc_resolution, project_volume, resolution_angstrom
from distdrgn.simulate import clean_images, random_rotations

D = 32


@pytest.fixture(scope="module")
def volume():
    return model_volume(pseudo_atomic_model(0), 0.3, True, D)


@pytest.fixture(scope="module")
def poses():
    gen = torch.Generator().manual_seed(1)
    rots = random_rotations(64, gen).float()
    trans = (torch.randn(64, 2, generator=gen, dtype=torch.float64) * 2.0 / D).float()
    return rots, trans


def _corr(a, b):
    a = a - a.mean(dim=(-2, -1), keepdim=True)
    b = b - b.mean(dim=(-2, -1), keepdim=True)
    return (a * b).sum((-2, -1)) / (a.norm(dim=(-2, -1)) * b.norm(dim=(-2, -1)))


def test_project_volume_matches_analytic_projections(volume, poses):
    """Trilinear Fourier-slice projection of the rendered model = the analytic images of the simulator."""
    rots, trans = poses
    n = rots.shape[0]
    c, sub = torch.full((n,), 0.3), torch.ones(n, dtype=torch.bool)
    analytic = clean_images(pseudo_atomic_model(0), D, rots, trans, None, c, sub)
    proj = project_volume(volume, rots, trans, oversample=2)
    rel = (proj - analytic).norm() / analytic.norm()
    assert _corr(proj, analytic).min() > 0.99
    assert rel < 0.1
    # The same check fails when the rotation is transposed or the shift negated.
    assert _corr(project_volume(volume, rots.transpose(1, 2), trans, oversample=2), analytic).mean() < 0.8
    assert _corr(project_volume(volume, rots, -trans, oversample=2), analytic).mean() < 0.8


def test_projection_shift_is_undone_by_translate_ht(volume, poses):
    """Moving the observed image by trans * D with lattice.translate_ht recovers the centred projection."""
    rots, trans = poses
    shifted = project_volume(volume, rots, trans)
    centred = project_volume(volume, rots)
    lat = Lattice(D)
    idx = lat.mask_indices
    h_shift = symmetrize_ht(ht2_center(shifted.double())).reshape(len(rots), -1)[:, idx]
    h_cent = symmetrize_ht(ht2_center(centred.double())).reshape(len(rots), -1)[:, idx]
    # The aliased +-1/2 rows/columns of the symmetrised lattice are not true Hermitian pairs: compare inside.
    inner = lat.masked_freqs.double().norm(dim=1) < 0.45
    back = translate_ht(h_shift, lat.masked_freqs.double(), trans.double() * D)
    err = (back - h_cent)[:, inner].norm() / h_cent[:, inner].norm()
    assert err < 1e-5
    wrong = translate_ht(h_shift, lat.masked_freqs.double(), -trans.double() * D)
    assert (wrong - h_cent)[:, inner].norm() / h_cent[:, inner].norm() > 0.3


def test_backproject_recovers_volume_and_streams(volume):
    gen = torch.Generator().manual_seed(2)
    n = 1500
    rots = random_rotations(n, gen).float()
    trans = (torch.randn(n, 2, generator=gen, dtype=torch.float64) * 1.5 / D).float()
    images = project_volume(volume, rots, trans, oversample=2)
    rec = backproject(images, rots, trans)
    freqs, curve = fsc(rec, volume)
    assert curve[freqs <= 0.25].min() > 0.95
    # An iterator of batches gives the same volume as the whole array.
    batches = (images[s : s + 200].numpy() for s in range(0, n, 200))
    rec2 = backproject(batches, rots, trans)
    assert torch.allclose(rec, rec2, atol=1e-5 * float(rec.abs().max()))
    near = backproject(images, rots, trans, interpolation="nearest")
    f2, c2 = fsc(near, volume)
    assert c2[f2 <= 0.2].min() > 0.8


def test_backproject_rejects_count_mismatch(volume):
    rots = random_rotations(4, torch.Generator().manual_seed(0)).float()
    images = torch.zeros(3, D, D)
    with pytest.raises(ValueError, match="3 images but 4 poses"):
        backproject(images, rots)


def test_fsc_properties(volume):
    freqs, curve = fsc(volume, volume)
    assert freqs[0] == 0 and freqs[-1] == 0.5 and len(freqs) == D // 2 + 1
    np.testing.assert_allclose(curve, 1.0, atol=1e-9)
    noise = torch.randn(D, D, D, generator=torch.Generator().manual_seed(0))
    _, c_noise = fsc(volume, noise)
    assert np.abs(c_noise[6:]).max() < 0.15  # shells of >= 400 voxels: |FSC| ~ 1/sqrt(n/2)
    _, c_neg = fsc(volume, -volume)
    np.testing.assert_allclose(c_neg, -1.0, atol=1e-9)


def test_fsc_resolution_interpolates_crossing():
    freqs = np.arange(9) / 16
    curve = np.array([1.0, 0.99, 0.9, 0.7, 0.5, 0.3, 0.1, 0.05, 0.0])
    assert fsc_resolution(freqs, curve, 0.5) == pytest.approx(4 / 16)
    assert fsc_resolution(freqs, curve, 0.143) == pytest.approx(5 / 16 + (0.3 - 0.143) / 0.2 / 16)
    assert resolution_angstrom(freqs, curve, apix=2.0, threshold=0.5) == pytest.approx(8.0)
    assert fsc_resolution(freqs, np.ones(9), 0.5) == 0.5
