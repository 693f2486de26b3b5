"""The (D+1) x (D+1) Fourier lattice: coordinates, masks, Hermitian halves, phase shifts.

Lattice index ``(j_y, j_x)`` of the symmetrised Hartley image holds frequency
``k = ((j_x - D/2) / D, (j_y - D/2) / D)`` in cycles per pixel, so coordinates span
[-0.5, 0.5] in x (columns) and y (rows). A slice of the volume for pose ``R`` samples
the 3D transform at the row vectors ``[k_x, k_y, 0] @ R`` (docs/conventions.md).

Only points inside the circle of radius D/2 (in lattice steps), excluding DC, are modelled.
They are ordered as ``[half, mirror]``: ``half`` holds one of every ``(k, -k)`` pair and
``mirror[i]`` is the index of ``-half[i]``, so the conjugate partner of the masked point at
position ``p`` is at position ``(p + n_half) % n_masked``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Lattice:
    """Geometry of the symmetrised Hartley lattice for images of box ``D`` (even)."""

    D: int

    def __post_init__(self):
        if self.D % 2 or self.D < 4:
            raise ValueError(f"box size must be even and >= 4, got {self.D}")

    @property
    def size(self) -> int:
        """Points per side, D + 1."""
        return self.D + 1

    @cached_property
    def coords(self) -> torch.Tensor:
        """((D+1)^2, 3) float32 coordinates [k_x, k_y, 0], row-major over (j_y, j_x)."""
        k = (torch.arange(self.size, dtype=torch.float64) - self.D // 2) / self.D
        ky, kx = torch.meshgrid(k, k, indexing="ij")
        return torch.stack([kx.ravel(), ky.ravel(), torch.zeros(self.size**2, dtype=torch.float64)], -1).float()

    def circle_indices(self, radius: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices ``(half, mirror)`` of the lattice points with 0 < |k| <= radius.

        ``radius`` is in lattice steps (default D/2, the Nyquist circle). Each is (n_half,)
        int64; ``mirror[i]`` is the point at ``-k`` of ``half[i]``. ``half`` holds the points
        with k_y < 0, and those with k_y == 0, k_x < 0.
        """
        r = self.D / 2 if radius is None else radius
        j = torch.arange(self.size) - self.D // 2
        jy, jx = torch.meshgrid(j, j, indexing="ij")
        inside = (jx**2 + jy**2 <= r * r) & ~((jx == 0) & (jy == 0))
        half = inside & ((jy < 0) | ((jy == 0) & (jx < 0)))
        half_idx = torch.nonzero(half.ravel()).squeeze(1)
        iy, ix = half_idx // self.size, half_idx % self.size
        mirror_idx = (self.D - iy) * self.size + (self.D - ix)
        return half_idx, mirror_idx

    @cached_property
    def mask_indices(self) -> torch.Tensor:
        """(n_masked,) flat indices of the modelled points, ordered [half, mirror]."""
        half, mirror = self.circle_indices()
        return torch.cat([half, mirror])

    @property
    def n_masked(self) -> int:
        return int(self.mask_indices.numel())

    @property
    def n_half(self) -> int:
        return self.n_masked // 2

    @cached_property
    def masked_freqs(self) -> torch.Tensor:
        """(n_masked, 2) float32 frequencies (k_x, k_y) in cycles/pixel of the masked points."""
        return self.coords[self.mask_indices, :2]


def rotate_coords(coords: torch.Tensor, rots: torch.Tensor) -> torch.Tensor:
    """Slice coordinates: (P, 3) lattice points and (B, 3, 3) rotations -> (B, P, 3) = coords @ R.

    At least float32 (float64 stays float64), with autocast off: under bf16 autocast the
    product would round the coordinates to 8 bits of mantissa (~2e-3 at |k| = 0.5), which the
    positional encoding multiplies by frequencies of up to ~D: phase errors of 0.1 rad and more.
    """
    dtype = torch.float64 if torch.float64 in (coords.dtype, rots.dtype) else torch.float32
    with torch.autocast(rots.device.type, enabled=False):
        return coords.to(rots.device, dtype) @ rots.to(dtype)


def random_rotations(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 3, 3) float64 rotations uniform on SO(3) (normalised Gaussian quaternions)."""
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=1, keepdim=True)
    w, x, y, z = q.unbind(1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        1,
    )


def mirror_values(values: torch.Tensor) -> torch.Tensor:
    """Values at -k for values in [half, mirror] order: (..., n_masked) -> (..., n_masked)."""
    n_half = values.shape[-1] // 2
    return torch.cat([values[..., n_half:], values[..., :n_half]], dim=-1)


def translate_ht(ht: torch.Tensor, freqs: torch.Tensor, shift_px: torch.Tensor) -> torch.Tensor:
    """Shift images by ``shift_px`` pixels via a phase shift of their Hartley values.

    ht: (B, n_masked) Hartley values in [half, mirror] order; freqs: (n_masked, 2) cycles/pixel;
    shift_px: (B, 2) pixels (x, y). Returns the Hartley values of the image moved by +shift:
    ``H'(k) = cos(2 pi k.t) H(k) + sin(2 pi k.t) H(-k)``.
    """
    phase = 2 * torch.pi * (shift_px.to(freqs.dtype) @ freqs.T)  # (B, n_masked)
    return torch.cos(phase) * ht + torch.sin(phase) * mirror_values(ht)
