"""Centred FFT / Hartley transforms against direct numpy computations."""

import numpy as np
import pytest
import torch

from distdrgn.fft import (
    downsample,
    fft2_center,
    ht2_center,
    ht3_center,
    iht2_center,
    iht3_center,
    symmetrize_ht,
    window_mask,
)


def _direct_centred_dft(img: np.ndarray) -> np.ndarray:
    """DFT with the image centre at pixel D/2 and frequency index D/2 as DC, by explicit sums."""
    D = img.shape[-1]
    n = np.arange(D) - D // 2
    E = np.exp(-2j * np.pi * np.outer(n, n) / D)  # E[k, x]
    return E @ img @ E.T


def test_fft2_center_matches_direct_sum():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(8, 8))
    got = fft2_center(torch.from_numpy(img)).numpy()
    np.testing.assert_allclose(got, _direct_centred_dft(img), atol=1e-10)


def test_delta_at_centre_has_flat_spectrum():
    img = torch.zeros(6, 6, dtype=torch.float64)
    img[3, 3] = 1.0
    np.testing.assert_allclose(ht2_center(img).numpy(), np.ones((6, 6)), atol=1e-12)


def test_hartley_is_re_minus_im_and_inverts():
    rng = np.random.default_rng(1)
    img = torch.from_numpy(rng.normal(size=(3, 10, 10)))
    f = fft2_center(img)
    np.testing.assert_allclose(ht2_center(img).numpy(), (f.real - f.imag).numpy())
    np.testing.assert_allclose(iht2_center(ht2_center(img)).numpy(), img.numpy(), atol=1e-12)
    vol = torch.from_numpy(rng.normal(size=(6, 6, 6)))
    np.testing.assert_allclose(iht3_center(ht3_center(vol)).numpy(), vol.numpy(), atol=1e-12)


def test_symmetrize_copies_first_row_and_column():
    h = torch.arange(16.0).reshape(4, 4)
    s = symmetrize_ht(h)
    assert s.shape == (5, 5)
    assert torch.equal(s[:4, :4], h)
    assert torch.equal(s[4, :4], h[0])
    assert torch.equal(s[:4, 4], h[:, 0])
    assert s[4, 4] == h[0, 0]


def test_symmetrized_hartley_of_real_image_is_point_symmetric_pairwise():
    # For a real image, F(-k) = conj F(k), so HT(k) + HT(-k) = 2 Re F(k) and HT(k) - HT(-k) = -2 Im F(k).
    rng = np.random.default_rng(2)
    img = torch.from_numpy(rng.normal(size=(8, 8)))
    s = symmetrize_ht(ht2_center(img)).numpy()
    f = fft2_center(img).numpy()
    flipped = s[::-1, ::-1]
    np.testing.assert_allclose((s + flipped)[:8, :8] / 2, f.real, atol=1e-10)


def test_window_profile():
    w = window_mask(64)
    assert w.shape == (64, 64)
    assert w[32, 32] == 1.0  # centre
    assert w[0, 0] == 0.0  # corner, outside the outer radius
    assert w[32, 0] == 0.0  # radius 1.0 > 0.99
    # on the soft edge the profile falls linearly from 1 at r = 0.85 to 0 at r = 0.99
    x = 61  # r = 29/32 of the half box
    expected = 1 - (29 / 32 - 0.85) / (0.99 - 0.85)
    assert abs(float(w[32, x]) - expected) < 1e-6


def test_downsample_preserves_low_frequencies_and_integral():
    rng = np.random.default_rng(3)
    D, d = 32, 16
    # band-limited image: only frequencies inside the small box
    h = np.zeros((D, D))
    c = D // 2
    h[c - 4 : c + 4, c - 4 : c + 4] = rng.normal(size=(8, 8))
    img = iht2_center(torch.from_numpy(h)).numpy()
    small = downsample(img[None].astype(np.float32), d)[0]
    assert small.dtype == np.float32 and small.shape == (d, d)
    assert abs(small.sum() - img.sum()) < 1e-3 * max(1.0, abs(img.sum()))
    # same Hartley coefficients on the cropped lattice
    hs = ht2_center(torch.from_numpy(small.astype(np.float64))).numpy()
    np.testing.assert_allclose(hs, h[c - d // 2 : c + d // 2, c - d // 2 : c + d // 2], atol=1e-4)
    # torch input keeps its type
    assert isinstance(downsample(torch.from_numpy(img), d), torch.Tensor)


@pytest.mark.parametrize("d", [15, 0, 40])
def test_downsample_rejects_bad_sizes(d):
    with pytest.raises(ValueError):
        downsample(np.zeros((1, 32, 32), np.float32), d)
