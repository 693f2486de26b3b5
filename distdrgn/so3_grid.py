"""Grids on SO(3) and on in-plane shifts for pose search, and their subdivision.

Rotations follow :mod:`distdrgn.lattice`: a pose ``R`` samples the volume at ``[k_x, k_y, 0] @ R``.
Perturbations compose on the right, ``R @ so3_exp(omega)``; the rotation-angle distance is
bi-invariant, so a cell of side ``h`` around ``R`` in the tangent coordinates ``omega`` is the
same size wherever ``R`` is.

A grid of ``n`` rotations stands for ``n`` cells of equal volume; SO(3) with the rotation-angle
metric has volume ``8 pi^2``, so a cell is a cube of side ``(8 pi^2 / n)^(1/3)``
(:func:`grid_spacing`). Subdividing a cell gives its centre and the 8 centres of its half-size
sub-cubes, at ``omega`` in ``{-h/4, +h/4}^3``.
"""

from __future__ import annotations

import itertools
import math

import torch

# Alexa, "Super-Fibonacci Spirals: Fast, Low-Discrepancy Sampling of SO(3)", CVPR 2022:
# phi = sqrt(2) and psi, the real root of psi^4 = psi + 4.
_PHI = math.sqrt(2.0)
_PSI = 1.533751168755204288118041


def _quaternion_matrices(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Unit quaternions (w, x, y, z), each (n,), -> (n, 3, 3); the formula of ``lattice.random_rotations``."""
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        1,
    )


def base_rotations(n: int) -> torch.Tensor:
    """(n, 3, 3) float64 near-uniform deterministic rotations (super-Fibonacci spiral).

    Point i of the spiral is the unit quaternion ``(r sin a, r cos a, R sin b, R cos b)`` with
    ``s = i + 1/2``, ``r = sqrt(s/n)``, ``R = sqrt(1 - s/n)``, ``a = 2 pi s / phi``,
    ``b = 2 pi s / psi``, read as (w, x, y, z). The spiral is uniform on S^3, and any fixed
    assignment of its components is an isometry of S^3, so the rotations are uniform on SO(3).
    """
    if n < 1:
        raise ValueError(f"need at least one rotation, got {n}")
    s = torch.arange(n, dtype=torch.float64) + 0.5
    r = torch.sqrt(s / n)
    big_r = torch.sqrt(1.0 - s / n)
    alpha = 2 * math.pi * s / _PHI
    beta = 2 * math.pi * s / _PSI
    return _quaternion_matrices(r * torch.sin(alpha), r * torch.cos(alpha), big_r * torch.sin(beta), big_r * torch.cos(beta))


def grid_spacing(n: int) -> float:
    """Side in radians of the cube cell each of ``n`` grid rotations stands for: (8 pi^2 / n)^(1/3)."""
    return (8 * math.pi**2 / n) ** (1.0 / 3.0)


def skew(omega: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 3, 3) matrices ``K`` with ``K v = omega x v``."""
    x, y, z = omega.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack(
        [torch.stack([o, -z, y], -1), torch.stack([z, o, -x], -1), torch.stack([-y, x, o], -1)], -2
    )


def so3_exp(omega: torch.Tensor) -> torch.Tensor:
    """Exponential map (Rodrigues): (..., 3) axis-angle vectors -> (..., 3, 3) rotations.

    ``I + sin(t)/t K + (1 - cos t)/t^2 K^2`` with ``t = |omega|`` (``1 - cos t`` as
    ``2 sin^2(t/2)``, which does not cancel at small t). Below t = 1e-3 (1e-2 in
    float32) the two coefficients are their Taylor series, whose error there is below the
    rounding of the closed form; the square root is taken of a value kept away from 0, so the
    gradient is finite at omega = 0 (gradient pose refinement starts there).
    """
    t2 = (omega * omega).sum(-1)
    small = t2 < (1e-6 if omega.dtype == torch.float64 else 1e-4)
    t2_safe = torch.where(small, torch.ones_like(t2), t2)
    t = torch.sqrt(t2_safe)
    a = torch.where(small, 1 - t2 / 6 + t2 * t2 / 120, torch.sin(t) / t)
    b = torch.where(small, 0.5 - t2 / 24 + t2 * t2 / 720, 2 * torch.sin(t / 2) ** 2 / t2_safe)  # no 1 - cos t
    k = skew(omega)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device)
    return eye + a[..., None, None] * k + b[..., None, None] * (k @ k)


def _rotation_offsets(spacing: float, dtype, device) -> torch.Tensor:
    """(9, 3): 0, then the 8 corners of {-spacing/4, +spacing/4}^3 (itertools.product order)."""
    q = spacing / 4
    corners = list(itertools.product((-q, q), repeat=3))
    return torch.tensor([(0.0, 0.0, 0.0), *corners], dtype=dtype, device=device)


def subdivide_rotations(rots: torch.Tensor, spacing: float) -> torch.Tensor:
    """Children of grid cells of side ``spacing``: (..., M, 3, 3) -> (..., M * 9, 3, 3).

    For each parent, in order: the parent itself, then ``R @ so3_exp(omega)`` for the 8 offsets
    omega in ``{-spacing/4, +spacing/4}^3``, the centres of the half-size sub-cubes. The
    children's cells have side ``spacing / 2``.
    """
    steps = so3_exp(_rotation_offsets(spacing, rots.dtype, rots.device))  # (9, 3, 3)
    children = rots[..., :, None, :, :] @ steps  # (..., M, 9, 3, 3)
    return children.reshape(*rots.shape[:-3], rots.shape[-3] * 9, 3, 3)


def shift_grid(extent_px: float, step_px: float) -> torch.Tensor:
    """(S, 2) float64 shifts (x, y) in pixels on a square grid of step ``step_px`` over
    [-extent, extent], S = (2 floor(extent / step) + 1)^2; row-major over (y, x), so the zero
    shift is the middle row."""
    if not step_px > 0 or extent_px < 0:
        raise ValueError(f"need step > 0 and extent >= 0, got step {step_px}, extent {extent_px}")
    n = int(math.floor(extent_px / step_px + 1e-9))
    v = torch.arange(-n, n + 1, dtype=torch.float64) * step_px
    gy, gx = torch.meshgrid(v, v, indexing="ij")
    return torch.stack([gx.ravel(), gy.ravel()], -1)


def subdivide_shifts(shifts: torch.Tensor, step: float) -> torch.Tensor:
    """Children of shifts on a grid of ``step``: (..., M, 2) -> (..., M * 9, 2).

    Each shift plus the offsets ``{-step/2, 0, +step/2}^2``, the unchanged shift first; the new
    step is ``step / 2``.
    """
    h = step / 2
    ring = [(dx, dy) for dy in (-h, 0.0, h) for dx in (-h, 0.0, h) if (dx, dy) != (0.0, 0.0)]
    offsets = torch.tensor([(0.0, 0.0), *ring], dtype=shifts.dtype, device=shifts.device)  # (9, 2)
    children = shifts[..., :, None, :] + offsets
    return children.reshape(*shifts.shape[:-2], shifts.shape[-2] * 9, 2)


def angle_between(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """Rotation angle of ``R1^T R2`` in radians, in [0, pi]: (..., 3, 3) each -> (...).

    ``atan2(sin, cos)`` from the antisymmetric part and the trace: accurate at small angles,
    where ``acos`` of the trace loses half the digits.
    """
    m = r1.transpose(-1, -2) @ r2
    cos = ((m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]) - 1) / 2
    v = torch.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1)
    sin = v.norm(dim=-1) / 2
    return torch.atan2(sin, cos.clamp(-1.0, 1.0))
