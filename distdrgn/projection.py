"""Fourier-slice projection of volumes, voxel back-projection, and Fourier shell correlation.

Conventions (docs/conventions.md): a volume is a real ``(D, D, D)`` array with axes ``[z, y, x]`` and
its centre at voxel ``(D/2, D/2, D/2)``; an image is ``(D, D)`` with row = y, column = x and its
centre at pixel ``(D/2, D/2)``. For pose ``R`` the image is the projection along z of
``V(R^T x)``, so its centred 2D transform at frequency ``k = (k_x, k_y)`` equals the centred 3D
transform of the volume at the row vector ``[k_x, k_y, 0] @ R`` (Fourier slice theorem).
``trans`` (fraction of the box, (x, y)) is the shift that re-centres an observed image, so the
observed image is the centred projection moved by ``-trans * D`` pixels: its transform is the
slice times ``exp(+2 pi i k . trans * D)``.

Frequencies are in cycles per pixel; "lattice units" are cycles per box (frequency times D),
i.e. indices relative to the centre of the centred transform.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from distdrgn.ctf import ctf_for_images
from distdrgn.fft import fft2_center, fft3_center, ifft2_center, ifft3_center

ArrayLike = torch.Tensor | np.ndarray


def _as_tensor(x: ArrayLike, dtype=torch.float32, device=None) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return x.to(dtype=dtype, device=device)


def image_freqs(D: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(D*D, 2) frequencies (k_x, k_y) in cycles/pixel of the centred D x D transform, row-major over (y, x)."""
    k = (torch.arange(D, dtype=torch.float64, device=device) - D // 2) / D
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    return torch.stack([kx.ravel(), ky.ravel()], -1).to(dtype)


def phase_shift_images(f: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Move images by ``shift_px`` pixels (x, y) in Fourier space.

    f: (B, D, D) centred 2D transforms; shift_px: (B, 2). Returns ``f * exp(-2 pi i k . shift)``,
    the transform of ``x -> image(x - shift)``, which is what :func:`distdrgn.lattice.translate_ht`
    does to Hartley values.
    """
    D = f.shape[-1]
    freqs = image_freqs(D, torch.float64, f.device)  # (D*D, 2)
    phase = -2 * math.pi * (shift_px.to(torch.float64) @ freqs.T)  # (B, D*D)
    rot = torch.polar(torch.ones_like(phase), phase).to(f.dtype)
    return f * rot.view(-1, D, D)


def _sample_trilinear(fvol: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of a complex centred 3D transform.

    fvol: (M, M, M) complex, axes [z, y, x], DC at M/2; coords: (B, P, 3) lattice units (x, y, z)
    relative to DC. Points outside the grid read 0. Returns (B, P) complex.
    """
    M = fvol.shape[-1]
    vol = torch.stack([fvol.real, fvol.imag])[None]  # (1, 2, M, M, M)
    # grid_sample with align_corners=True maps -1 -> index 0 and +1 -> index M-1; its last grid
    # axis is ordered (x, y, z) = (W, H, D), matching our coordinate order.
    grid = (coords + M // 2) * (2.0 / (M - 1)) - 1.0
    B, P, _ = coords.shape
    out = F.grid_sample(
        vol.to(coords.dtype), grid.view(1, B, P, 1, 3), mode="bilinear", padding_mode="zeros", align_corners=True
    )  # (1, 2, B, P, 1)
    out = out[0, :, :, :, 0]
    return torch.complex(out[0], out[1])


def project_volume(
    vol: ArrayLike,
    rots: ArrayLike,
    trans: ArrayLike | None = None,
    *,
    oversample: int = 1,
    batch_size: int = 256,
) -> torch.Tensor:
    """Project a volume along z for each pose via the Fourier slice theorem.

    vol: (D, D, D) real, axes [z, y, x]; rots: (B, 3, 3); trans: (B, 2) fraction of the box or
    None (centred). The centred 3D transform is sampled by trilinear interpolation at
    ``[k_x, k_y, 0] @ R`` for the D x D image frequencies. ``oversample`` > 1 zero-pads the volume
    to ``oversample * D`` first, which makes the Fourier grid finer and the interpolation more
    accurate. Returns (B, D, D) float32 images such that translating image i by ``trans[i] * D``
    pixels re-centres it.
    """
    v = _as_tensor(vol, torch.float32)
    D = v.shape[-1]
    if v.shape != (D, D, D) or D % 2:
        raise ValueError(f"volume must be (D, D, D) with D even, got {tuple(v.shape)}")
    r = _as_tensor(rots, torch.float32, v.device)
    if oversample > 1:
        M = oversample * D
        pad = (M - D) // 2
        v = F.pad(v, (pad, M - D - pad) * 3)
    fvol = fft3_center(v.to(torch.float64)).to(torch.complex64)
    coords2 = torch.cat([image_freqs(D, device=v.device), torch.zeros(D * D, 1, device=v.device)], -1)
    coords2 = coords2 * (oversample * D)  # lattice units of the (padded) grid
    out = []
    for s in range(0, r.shape[0], batch_size):
        rb = r[s : s + batch_size]
        slices = _sample_trilinear(fvol, coords2 @ rb).view(-1, D, D)
        if trans is not None:
            t = _as_tensor(trans, torch.float64, v.device)[s : s + batch_size]
            slices = phase_shift_images(slices, -t * D)
        out.append(ifft2_center(slices).real.to(torch.float32))
    return torch.cat(out) if out else torch.zeros(0, D, D)


def _iter_batches(images, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(images, (torch.Tensor, np.ndarray)):
        for s in range(0, images.shape[0], batch_size):
            yield _as_tensor(images[s : s + batch_size])
    else:
        for b in images:
            yield _as_tensor(b)


def backproject(
    images: ArrayLike | Iterable[ArrayLike],
    rots: ArrayLike,
    trans: ArrayLike | None = None,
    ctf: ArrayLike | None = None,
    *,
    interpolation: str = "trilinear",
    reg: float = 1e-3,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Voxel (Fourier-space) back-projection reconstruction of a volume from posed images.

    images: (N, D, D) array, or an iterable of (B, D, D) batches consumed in order (rows of the
    other arrays follow the running image count); rots: (N, 3, 3); trans: (N, 2) fraction of the
    box or None; ctf: (N, 9) ctf.pkl rows or None. Each image is moved by ``trans * D`` pixels
    (re-centred), its centred transform is inserted at ``[k_x, k_y, 0] @ R`` into a 3D grid
    (``"nearest"`` or ``"trilinear"`` gridding, points with |k| < D/2 - 1), and the volume
    transform is ``sum(w CTF F) / (sum(w CTF^2) + reg * mean(sum(w CTF^2)))`` (w = gridding
    weight; CTF = 1 when ``ctf`` is None). Images are used with the sign given: negate real
    (inverted-contrast) stacks first. Returns the real-space (D, D, D) float32 volume on CPU.
    """
    if interpolation not in ("nearest", "trilinear"):
        raise ValueError(f"interpolation must be 'nearest' or 'trilinear', got {interpolation!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    r_all = _as_tensor(rots, torch.float64)
    t_all = None if trans is None else _as_tensor(trans, torch.float64)
    c_all = None if ctf is None else _as_tensor(ctf, torch.float64)
    num = den = None
    offset = 0
    for img in _iter_batches(images, batch_size):
        B, D = img.shape[0], img.shape[-1]
        if num is None:
            num = torch.zeros(D**3, dtype=torch.complex128, device=dev)
            den = torch.zeros(D**3, dtype=torch.float64, device=dev)
            freqs = image_freqs(D, torch.float64, dev)
            keep = (freqs.square().sum(-1) * D * D) < (D / 2 - 1) ** 2
            freqs = freqs[keep]  # (P, 2)
            coords2 = torch.cat([freqs, torch.zeros(freqs.shape[0], 1, dtype=freqs.dtype, device=dev)], -1) * D
        if offset + B > r_all.shape[0]:
            raise ValueError(f"more images than poses ({r_all.shape[0]})")
        f = fft2_center(img.to(dev, torch.float64))
        if t_all is not None:
            f = phase_shift_images(f, t_all[offset : offset + B].to(dev) * D)
        f = f.reshape(B, -1)[:, keep]  # (B, P)
        if c_all is not None:
            c = ctf_for_images(c_all[offset : offset + B].to(dev), freqs, D)
        else:
            c = torch.ones_like(f.real)
        q = (coords2 @ r_all[offset : offset + B].to(dev)).reshape(-1, 3) + D // 2  # (B*P, 3) x, y, z
        val, wt = (c * f).reshape(-1), (c * c).reshape(-1)
        if interpolation == "nearest":
            idx = torch.round(q).long()
            flat = (idx[:, 2] * D + idx[:, 1]) * D + idx[:, 0]
            num.index_add_(0, flat, val)
            den.index_add_(0, flat, wt)
        else:
            q0 = torch.floor(q)
            frac = q - q0
            q0 = q0.long()
            for dz in (0, 1):
                for dy in (0, 1):
                    for dx in (0, 1):
                        w = (
                            (frac[:, 0] if dx else 1 - frac[:, 0])
                            * (frac[:, 1] if dy else 1 - frac[:, 1])
                            * (frac[:, 2] if dz else 1 - frac[:, 2])
                        )
                        flat = ((q0[:, 2] + dz) * D + (q0[:, 1] + dy)) * D + (q0[:, 0] + dx)
                        num.index_add_(0, flat, w * val)
                        den.index_add_(0, flat, w * wt)
        offset += B
    if num is None:
        raise ValueError("no images to back-project")
    if offset != r_all.shape[0]:
        raise ValueError(f"{offset} images but {r_all.shape[0]} poses")
    filled = den > 0
    eps = reg * den[filled].mean() if filled.any() else 0.0
    fvol = torch.where(filled, num / (den + eps), torch.zeros_like(num))
    vol = ifft3_center(fvol.view(D, D, D)).real
    return vol.to(torch.float32).cpu()


def fsc(vol1: ArrayLike, vol2: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Fourier shell correlation of two (D, D, D) volumes.

    Shell ``s`` holds the voxels of the centred transforms with ``round(|k| * D) == s``, for
    s = 0 .. D/2; ``freqs[s] = s / D`` in cycles/pixel (0.5 = Nyquist). Returns
    ``(freqs, curve)``, both (D/2 + 1,) float64 numpy arrays, with
    ``curve[s] = Re sum F1 conj(F2) / sqrt(sum |F1|^2 sum |F2|^2)`` over the shell.
    """
    a = _as_tensor(vol1, torch.float64)
    b = _as_tensor(vol2, torch.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"volumes must have the same (D, D, D) shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    D = a.shape[-1]
    fa, fb = fft3_center(a), fft3_center(b)
    k = torch.arange(D, dtype=torch.float64) - D // 2
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    shell = torch.round(r).long().ravel()
    n = D // 2 + 1
    inside = shell < n
    shell = shell[inside]
    cross = torch.zeros(n, dtype=torch.float64).index_add_(0, shell, (fa * fb.conj()).real.ravel()[inside])
    pa = torch.zeros(n, dtype=torch.float64).index_add_(0, shell, fa.abs().square().ravel()[inside])
    pb = torch.zeros(n, dtype=torch.float64).index_add_(0, shell, fb.abs().square().ravel()[inside])
    curve = cross / torch.sqrt(pa * pb).clamp_min(1e-300)
    return np.arange(n) / D, curve.numpy()


def fsc_resolution(freqs: np.ndarray, curve: np.ndarray, threshold: float = 0.143) -> float:
    """First frequency (cycles/pixel) where the FSC curve drops below ``threshold``.

    Linear interpolation between the shells around the crossing; the DC shell is ignored.
    Returns the last frequency (Nyquist) when the curve never drops below the threshold.
    Divide the pixel size by the result for a resolution in Angstrom.
    """
    for i in range(1, len(curve)):
        if curve[i] < threshold:
            c0, c1 = curve[i - 1], curve[i]
            f0, f1 = freqs[i - 1], freqs[i]
            return float(f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0)) if c0 != c1 else float(f1)
    return float(freqs[-1])


def resolution_angstrom(freqs: np.ndarray, curve: np.ndarray, apix: float, threshold: float = 0.143) -> float:
    """Resolution in Angstrom at the ``threshold`` crossing (0.5 or 0.143 by custom)."""
    return apix / fsc_resolution(freqs, curve, threshold)
