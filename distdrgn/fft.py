"""Centred Fourier and Hartley transforms of images and volumes (docs/conventions.md).

Images are real ``(..., D, D)`` arrays with row = y, column = x and the centre at pixel
``(D/2, D/2)``. The centred transform is ``fftshift(fft(fftshift(x)))`` over the last two
(or three) axes, so the zero frequency sits at index ``D/2``; the Hartley transform is
``Re - Im`` of it and is its own inverse up to ``1 / D^2``.

All functions take and return torch tensors (CPU or GPU); :func:`downsample` also accepts
numpy arrays, for the ingest path.
"""

from __future__ import annotations

import numpy as np
import torch

_DIMS2 = (-2, -1)
_DIMS3 = (-3, -2, -1)


def fft2_center(x: torch.Tensor) -> torch.Tensor:
    """(..., D, D) real or complex -> (..., D, D) complex, DC at (D/2, D/2)."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.fftshift(x, dim=_DIMS2), dim=_DIMS2), dim=_DIMS2)


def ifft2_center(f: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2_center`: (..., D, D) complex -> (..., D, D) complex."""
    return torch.fft.ifftshift(torch.fft.ifft2(torch.fft.ifftshift(f, dim=_DIMS2), dim=_DIMS2), dim=_DIMS2)


def ht2_center(x: torch.Tensor) -> torch.Tensor:
    """Centred 2D Hartley transform: (..., D, D) real -> (..., D, D) real (unnormalised)."""
    f = fft2_center(x)
    return f.real - f.imag


def iht2_center(h: torch.Tensor) -> torch.Tensor:
    """Inverse centred 2D Hartley transform: (..., D, D) -> (..., D, D), divides by D*D."""
    f = fft2_center(h)
    return (f.real - f.imag) / (h.shape[-1] * h.shape[-2])


def fft3_center(v: torch.Tensor) -> torch.Tensor:
    """(..., D, D, D) -> complex, DC at (D/2, D/2, D/2); volume axes are (z, y, x)."""
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.fftshift(v, dim=_DIMS3), dim=_DIMS3), dim=_DIMS3)


def ifft3_center(f: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft3_center`."""
    return torch.fft.ifftshift(torch.fft.ifftn(torch.fft.ifftshift(f, dim=_DIMS3), dim=_DIMS3), dim=_DIMS3)


def ht3_center(v: torch.Tensor) -> torch.Tensor:
    """Centred 3D Hartley transform (unnormalised)."""
    f = fft3_center(v)
    return f.real - f.imag


def iht3_center(h: torch.Tensor) -> torch.Tensor:
    """Inverse centred 3D Hartley transform, divides by D^3."""
    f = fft3_center(h)
    return (f.real - f.imag) / (h.shape[-1] * h.shape[-2] * h.shape[-3])


def symmetrize_ht(h: torch.Tensor) -> torch.Tensor:
    """(..., D, D) centred HT -> (..., D+1, D+1): first row and column copied to the end.

    With D even, index 0 is frequency -1/2 and the appended index D is +1/2, the same
    (aliased) frequency, so the lattice becomes symmetric about its centre.
    """
    h = torch.cat([h, h[..., :1, :]], dim=-2)
    return torch.cat([h, h[..., :, :1]], dim=-1)


def window_mask(D: int, in_rad: float = 0.85, out_rad: float = 0.99) -> torch.Tensor:
    """Soft circular real-space window (D, D): 1 inside ``in_rad``, linear to 0 at ``out_rad``.

    Radii are fractions of the half box, measured from the image centre (D/2, D/2).
    """
    x = torch.arange(D, dtype=torch.float64) * (2.0 / D) - 1.0
    r = torch.sqrt(x[None, :] ** 2 + x[:, None] ** 2)
    w = 1.0 - (r - in_rad) / (out_rad - in_rad)
    return w.clamp(0.0, 1.0).to(torch.float32)


def downsample(images, d: int):
    """Fourier-crop (..., D, D) real images to (..., d, d), d even and <= D.

    Crops the centred Hartley transform to the central d x d frequencies and inverts with
    the ``1/d^2`` normalisation, as cryoDRGN does: the image integral (DC term) is
    preserved, so pixel values scale by (D/d)^2. Accepts numpy (returns float32 numpy) or
    torch tensors (returns the input dtype).
    """
    as_numpy = isinstance(images, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(images)) if as_numpy else images
    D = x.shape[-1]
    if d % 2 or d > D or d <= 0:
        raise ValueError(f"new box {d} must be even and at most the current box {D}")
    if d == D:
        out = x.to(torch.float32) if as_numpy else x
        return out.numpy() if as_numpy else out
    start = D // 2 - d // 2
    h = ht2_center(x.to(torch.float64))[..., start : start + d, start : start + d]
    out = iht2_center(h)
    return out.to(torch.float32).numpy() if as_numpy else out.to(x.dtype)
