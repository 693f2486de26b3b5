"""CTF against a direct evaluation of the formula in docs/conventions.md."""

import math

import numpy as np
import torch

from distdrgn.ctf import compute_ctf, ctf_for_images, electron_wavelength
from distdrgn.lattice import Lattice


def _ctf_reference(sx, sy, dfu, dfv, dfang, kv, cs, w, ps):
    V = kv * 1e3
    lam = 12.2639 / math.sqrt(V + 0.97845e-6 * V * V)
    s2 = sx**2 + sy**2
    a = np.arctan2(sy, sx)
    df = 0.5 * (dfu + dfv + (dfu - dfv) * np.cos(2 * (a - np.radians(dfang))))
    gamma = 2 * np.pi * (-0.5 * df * lam * s2 + 0.25 * cs * 1e7 * lam**3 * s2**2) - np.radians(ps)
    return np.sqrt(1 - w * w) * np.sin(gamma) - w * np.cos(gamma)


def test_wavelength_300kv():
    assert abs(float(electron_wavelength(torch.tensor(300.0))) - 0.019687) < 1e-5


def test_compute_ctf_matches_formula():
    rng = np.random.default_rng(0)
    s = rng.uniform(-0.2, 0.2, size=(50, 2))
    p = dict(dfu=15000.0, dfv=14200.0, dfang=33.0, kv=300.0, cs=2.7, w=0.1, ps=12.0)
    got = compute_ctf(torch.from_numpy(s)[None], *(torch.tensor([v], dtype=torch.float64) for v in p.values()))
    np.testing.assert_allclose(got[0].numpy(), _ctf_reference(s[:, 0], s[:, 1], *p.values()), atol=1e-10)
    assert float(compute_ctf(torch.zeros(1, 1, 2, dtype=torch.float64), *(torch.tensor([v], dtype=torch.float64) for v in p.values()))[0, 0]) < 0


def test_ctf_for_images_rescales_pixel_size_for_cropped_boxes():
    lat = Lattice(16)
    row = torch.tensor([[64, 1.5, 20000, 19000, 10, 300, 2.7, 0.07, 0]], dtype=torch.float64)
    got = ctf_for_images(row, lat.masked_freqs, D=16)
    apix = 1.5 * 64 / 16  # cropped 64 -> 16 pixels: each pixel is 4x larger
    f = lat.masked_freqs.double().numpy() / apix
    np.testing.assert_allclose(got[0].numpy(), _ctf_reference(f[:, 0], f[:, 1], 20000, 19000, 10, 300, 2.7, 0.07, 0), atol=1e-10)
