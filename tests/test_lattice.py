"""Lattice geometry, Hermitian halves and the Hartley phase shift."""

import numpy as np
import pytest
import torch

from distdrgn.fft import ht2_center, symmetrize_ht
from distdrgn.lattice import Lattice, mirror_values, rotate_coords, translate_ht


def test_coords_span_and_layout():
    lat = Lattice(8)
    c = lat.coords.reshape(9, 9, 3)
    assert torch.allclose(c[0, 0, :2], torch.tensor([-0.5, -0.5]))
    assert torch.allclose(c[8, 8, :2], torch.tensor([0.5, 0.5]))
    assert torch.allclose(c[4, 4], torch.zeros(3))
    # x varies along columns, y along rows
    assert c[0, 1, 0] > c[0, 0, 0] and c[0, 1, 1] == c[0, 0, 1]
    assert c[1, 0, 1] > c[0, 0, 1] and c[1, 0, 0] == c[0, 0, 0]


@pytest.mark.parametrize("D", [8, 16, 32])
def test_half_and_mirror_partition_the_circle(D):
    lat = Lattice(D)
    half, mirror = lat.circle_indices()
    c = lat.coords
    assert torch.allclose(c[mirror], -c[half])
    both = torch.cat([half, mirror])
    assert len(set(both.tolist())) == both.numel()  # disjoint, no duplicates
    r2 = (c[:, :2] ** 2).sum(-1) * D * D
    expected = torch.nonzero((r2 <= (D / 2) ** 2 + 1e-6) & (r2 > 0)).squeeze(1)
    assert sorted(both.tolist()) == sorted(expected.tolist())
    assert lat.n_masked == expected.numel() and lat.n_half * 2 == lat.n_masked


def test_mirror_values_swaps_halves():
    v = torch.arange(6.0)[None]
    assert mirror_values(v).tolist() == [[3.0, 4.0, 5.0, 0.0, 1.0, 2.0]]


def test_rotate_coords_is_row_vector_times_rotation():
    lat = Lattice(4)
    rot = torch.tensor([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])[None]
    out = rotate_coords(lat.coords, rot)
    np.testing.assert_allclose(out[0].numpy(), (lat.coords @ rot[0]).numpy())
    assert out.shape == (1, 25, 3)


def _shift_real(img: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Move image content by t = (tx, ty) pixels using the DFT shift theorem (periodic)."""
    D = img.shape[-1]
    k = np.fft.fftfreq(D)
    ph = np.exp(-2j * np.pi * (k[None, :] * t[0] + k[:, None] * t[1]))
    return np.fft.ifft2(np.fft.fft2(img) * ph).real


def test_translate_ht_moves_the_image_by_plus_t():
    """Integer shifts: translate_ht must equal the Hartley transform of the rolled image."""
    rng = np.random.default_rng(0)
    D = 16
    img = rng.normal(size=(D, D))
    t = np.array([3.0, -2.0])  # pixels (x, y)
    moved = np.roll(img, shift=(int(t[1]), int(t[0])), axis=(0, 1))  # content moves +x, +y
    np.testing.assert_allclose(_shift_real(img, t), moved, atol=1e-10)
    lat = Lattice(D)
    idx = lat.mask_indices
    h = symmetrize_ht(ht2_center(torch.from_numpy(img))).reshape(-1)[idx][None]
    h_moved = symmetrize_ht(ht2_center(torch.from_numpy(moved))).reshape(-1)[idx][None]
    got = translate_ht(h, lat.masked_freqs.double(), torch.from_numpy(t)[None])
    # the Nyquist points (|k| = 1/2 on an axis) are aliased and cannot carry a phase shift exactly
    inner = (lat.masked_freqs.abs().max(-1).values < 0.5)
    np.testing.assert_allclose(got[0, inner].numpy(), h_moved[0, inner].numpy(), atol=1e-8)


def test_translate_ht_round_trip_subpixel():
    rng = np.random.default_rng(1)
    lat = Lattice(12)
    h = torch.from_numpy(rng.normal(size=(2, lat.n_masked)))
    t = torch.tensor([[0.37, -1.25], [2.5, 0.1]], dtype=torch.float64)
    back = translate_ht(translate_ht(h, lat.masked_freqs.double(), t), lat.masked_freqs.double(), -t)
    np.testing.assert_allclose(back.numpy(), h.numpy(), atol=1e-10)
