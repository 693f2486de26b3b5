"""Contrast transfer function (docs/conventions.md) and the cryoDRGN ``ctf.pkl`` layout.

``ctf.pkl`` rows are ``[D, apix, dfu, dfv, dfang, kv, cs, w, phase_shift]``
(box in pixels, Angstrom/pixel, Angstrom, Angstrom, degrees, kV, mm, fraction, degrees).
"""

from __future__ import annotations

import math

import torch

CTF_COLUMNS = ("D", "apix", "dfu", "dfv", "dfang", "kv", "cs", "w", "phase_shift")


def electron_wavelength(kv: torch.Tensor) -> torch.Tensor:
    """Relativistic electron wavelength in Angstrom for accelerating voltage(s) in kV."""
    volt = kv * 1000.0
    return 12.2639 / torch.sqrt(volt + 0.97845e-6 * volt * volt)


def compute_ctf(
    freqs: torch.Tensor,
    dfu: torch.Tensor,
    dfv: torch.Tensor,
    dfang: torch.Tensor,
    kv: torch.Tensor,
    cs: torch.Tensor,
    w: torch.Tensor,
    phase_shift: torch.Tensor,
) -> torch.Tensor:
    """CTF at spatial frequencies ``freqs`` (B, P, 2) in 1/Angstrom, ordered (s_x, s_y).

    Each parameter is (B,) (or broadcastable to it), in the ctf.pkl units. Returns (B, P).
    Computed in float32 or float64 as ``freqs`` is; the phase term is large at high
    defocus, so callers that need precision pass float64.
    """
    p = [t.to(freqs.dtype).reshape(-1, 1) for t in (dfu, dfv, dfang, kv, cs, w, phase_shift)]
    dfu, dfv, dfang, kv, cs, w, phase_shift = p
    lam = electron_wavelength(kv)
    cs_a = cs * 1e7
    sx, sy = freqs[..., 0], freqs[..., 1]
    s2 = sx * sx + sy * sy
    angle = torch.atan2(sy, sx)
    df = 0.5 * (dfu + dfv + (dfu - dfv) * torch.cos(2 * (angle - torch.deg2rad(dfang))))
    gamma = 2 * math.pi * (-0.5 * df * lam * s2 + 0.25 * cs_a * lam**3 * s2 * s2) - torch.deg2rad(phase_shift)
    return torch.sqrt(1 - w * w) * torch.sin(gamma) - w * torch.cos(gamma)


def ctf_for_images(params: torch.Tensor, freqs_px: torch.Tensor, D: int) -> torch.Tensor:
    """CTF for images of box ``D`` from ctf.pkl rows.

    params: (B, 9) ctf.pkl rows (their box and pixel size may be those of the original,
    larger images: the pixel size is rescaled by ``params.D / D`` for a Fourier-cropped box);
    freqs_px: (P, 2) lattice frequencies in cycles/pixel. Returns (B, P).
    """
    apix = params[:, 1] * params[:, 0] / D  # (B,) Angstrom per pixel at this box size
    freqs = freqs_px.to(params.dtype)[None] / apix[:, None, None]
    return compute_ctf(freqs, *params[:, 2:9].unbind(-1))
