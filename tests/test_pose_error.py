import math

import numpy as np
import pytest
import torch

from distdrgn.atoms import gaussian_ft, pseudo_atomic_model, sigma_px
from distdrgn.lattice import Lattice, random_rotations, rotate_coords, translate_ht
from distdrgn.pose_error import FLIP, align_rotations, fit_3d_offset, shift_errors, summary

D = 16


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _hartley_slices(positions, rots):
    """Analytic Hartley values of the atoms (A, 3) at the masked lattice for poses (B, 3, 3)."""
    lattice = Lattice(D)
    coords = lattice.coords[lattice.mask_indices].double()
    q = rotate_coords(coords, rots.double())  # (B, P, 3)
    pos = positions[None].expand(rots.shape[0], -1, -1).double()
    f = gaussian_ft(q, pos, torch.ones(pos.shape[:2], dtype=torch.float64), sigma_px(D))
    return f.real - f.imag


@pytest.fixture(scope="module")
def atoms():
    m = pseudo_atomic_model(0)
    return torch.tensor(np.concatenate([m.core[::10], m.arm[::10]]) * D)


def test_global_rotation_composes_on_the_right(atoms):
    """A reconstruction rotated by Q (V'(x) = V(Q x): atoms at mu @ Q as rows) has poses R @ Q."""
    q = random_rotations(1, _gen(0))[0]
    rots = random_rotations(4, _gen(1))
    assert torch.allclose(_hartley_slices(atoms @ q, rots @ q), _hartley_slices(atoms, rots), atol=1e-9)
    assert not torch.allclose(_hartley_slices(atoms @ q, q @ rots), _hartley_slices(atoms, rots), atol=1e-3)
    # the hand flip: V'(x) = V(F x) has poses F R F
    assert torch.allclose(_hartley_slices(atoms @ FLIP, FLIP @ rots @ FLIP), _hartley_slices(atoms, rots), atol=1e-9)


@pytest.mark.parametrize("flip", [False, True])
def test_planted_rotation_and_flip_are_recovered(flip):
    ref = random_rotations(100, _gen(2))
    q = random_rotations(1, _gen(3))[0]
    found = ref @ q
    if flip:
        found = FLIP @ found @ FLIP
    out = align_rotations(found.float().double(), ref)
    assert out.flipped == flip and out.side == "right"
    assert out.errors_deg.max() < 1e-4  # float32 rounding of the input
    out = align_rotations(found, ref)
    assert out.errors_deg.max() < 1e-6
    assert torch.allclose(out.transform, q.T, atol=1e-9)
    assert torch.allclose(out.rotations, ref, atol=1e-9)


def test_left_composition_and_outliers():
    ref = random_rotations(200, _gen(4))
    q = random_rotations(1, _gen(5))[0]
    found = q @ ref
    found[:60] = random_rotations(60, _gen(6))  # 30% wrong poses
    out = align_rotations(found, ref)
    assert out.side == "left" and not out.flipped
    assert out.errors_deg[60:].max() < 1e-6  # the robust refit ignores the wrong poses
    assert out.errors_deg[:60].median() > 20


def test_random_poses_have_large_errors():
    out = align_rotations(random_rotations(300, _gen(7)), random_rotations(300, _gen(8)))
    assert out.errors_deg.median() > 60


def test_3d_offset_shows_up_as_pose_dependent_shifts(atoms):
    """A map moved by c (atoms at mu + c) needs the shift t + (R c)[:2] to explain an image of
    the original with shift t."""
    lattice = Lattice(D)
    freqs = lattice.masked_freqs.double()
    rots = random_rotations(6, _gen(9))
    t = torch.randn(6, 2, generator=_gen(10), dtype=torch.float64)
    c = torch.tensor([1.5, -0.7, 2.0], dtype=torch.float64)
    observed = translate_ht(_hartley_slices(atoms, rots), freqs, -t)  # as simulated: moved by -t
    moved_map = _hartley_slices(atoms + c, rots)
    t_found = t + (rots @ c)[:, :2]
    assert torch.allclose(translate_ht(observed, freqs, t_found), moved_map, atol=1e-8)
    assert not torch.allclose(translate_ht(observed, freqs, t), moved_map, atol=1e-2)


def test_shift_errors_remove_planted_offset():
    rots = random_rotations(50, _gen(11))
    ref = torch.randn(50, 2, generator=_gen(12), dtype=torch.float64)
    c = torch.tensor([0.8, 2.5, -1.2], dtype=torch.float64)
    found = ref + (rots @ c)[:, :2]
    assert torch.allclose(fit_3d_offset(found, ref, rots), c, atol=1e-10)
    assert shift_errors(found, ref, rots).max() < 1e-10
    assert shift_errors(found, ref).median() > 1.0  # as absolute shifts they differ
    # the fit is the same with the poses of a rotated (and flipped) reconstruction
    q = random_rotations(1, _gen(13))[0]
    assert shift_errors(found, ref, FLIP @ (rots @ q) @ FLIP).max() < 1e-10
    noisy = found + torch.tensor([[0.3, -0.4]], dtype=torch.float64) * torch.randn(50, 1, generator=_gen(14),
                                                                                   dtype=torch.float64)
    e = shift_errors(noisy, ref, rots)
    assert 0.05 < e.median() < 0.5


def test_summary():
    s = summary(torch.arange(1.0, 11.0))
    assert s["median"] == 5.0 and math.isclose(s["mean"], 5.5) and math.isclose(s["p90"], 9.1)
    assert all(math.isnan(v) for v in summary(torch.zeros(0)).values())
