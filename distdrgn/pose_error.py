"""Comparing two sets of poses of the same images (found vs true, ab initio vs a refinement).

A reconstruction from unknown poses is defined up to a global rotation and, since projections
do not fix the chirality, a hand flip; and up to a global 3D translation of the map.

Rotation (docs/conventions.md: image i samples the volume at ``k @ R_i``): if the reconstruction
is ``V'(x) = V(Q x)``, its transform is ``F'(q) = F(Q q)`` and the image of pose ``R`` is
``F(R^T k) = F'(Q^T R^T k)``, so the poses against ``V'`` are ``R Q``: the global rotation
composes on the **right**, ``found_i = reference_i @ Q``.

Hand flip: for ``V'(x) = V(F x)``, ``F = diag(1, 1, -1)``, and slice points ``k`` (``k_z = 0``,
``F k = k``): ``F(R^T k) = F'(F R^T F k)``, so the poses are ``F R F`` (a rotation).

Translation: if the reconstruction is moved by a 3D offset ``c`` (pixels, ``V'(x) = V(x - c)``),
the projection at pose ``R`` is moved in-plane by the first two components of ``R c`` (the
column vector; ``c @ R^T`` as a row), so the shift that re-centres the observation becomes
``t' = t + (R c)[:2]``. Fitting ``c`` by least squares removes it. The fit is the same whether
the found or the reference rotations are used: ``(R Q) c = R (Q c)`` and
``(F R F c)[:2] = (R F c)[:2]`` only rename ``c``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distdrgn.so3_grid import angle_between

FLIP = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))


@dataclass
class AlignedRotations:
    rotations: torch.Tensor  # (N, 3, 3) float64 found poses mapped onto the reference frame
    transform: torch.Tensor  # (3, 3) float64 global rotation G
    flipped: bool  # the found poses were conjugated by diag(1, 1, -1) first
    side: str  # "right": aligned = found' @ G (the convention's side); "left": G @ found'
    errors_deg: torch.Tensor  # (N,) float64 angle between aligned and reference poses


def _procrustes(m: torch.Tensor) -> torch.Tensor:
    """Rotation G maximising trace(G^T m): (3, 3) -> (3, 3)."""
    u, _, vh = torch.linalg.svd(m)
    d = torch.sign(torch.linalg.det(u @ vh))
    return u @ torch.diag(torch.stack([torch.ones_like(d), torch.ones_like(d), d])) @ vh


def _fit(found: torch.Tensor, ref: torch.Tensor, side: str, refits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global rotation G for one side, refitted on the inlier half ``refits`` times -> (G, errors rad)."""
    weights = torch.ones(found.shape[0], dtype=found.dtype, device=found.device)

    def solve(w):
        w = w[:, None, None]
        # right: min sum ||found G - ref||^2, max tr(G^T sum found^T ref); left: max tr(G^T sum ref found^T)
        m = (w * found.transpose(1, 2) @ ref).sum(0) if side == "right" else (w * ref @ found.transpose(1, 2)).sum(0)
        return _procrustes(m)

    for it in range(refits + 1):
        g = solve(weights)
        aligned = found @ g if side == "right" else g @ found
        err = angle_between(aligned, ref)
        if it < refits:
            weights = (err <= err.median()).to(found.dtype)
    return g, err


def align_rotations(found: torch.Tensor, reference: torch.Tensor, refits: int = 2) -> AlignedRotations:
    """Best global alignment of ``found`` (N, 3, 3) onto ``reference`` (N, 3, 3) poses.

    For the found poses as they are and hand-flipped (``F R F``), and for ``G`` composed on the
    right and on the left, G is the orthogonal Procrustes solution of the summed relative
    rotations, refitted ``refits`` times on the half with the smallest errors (robust to wrong
    poses); the combination with the smallest median angular error is returned. For this
    project's convention the right side is the physical one (module docstring); the left is
    tried as well so that poses from a program with the transposed convention align too.
    """
    found = found.to(torch.float64)
    reference = reference.to(found.device, torch.float64)
    flip = FLIP.to(found.device)
    best = None
    for flipped in (False, True):
        f = flip @ found @ flip if flipped else found
        for side in ("right", "left"):
            g, err = _fit(f, reference, side, refits)
            med = float(err.median())
            if best is None or med < best[0]:
                aligned = f @ g if side == "right" else g @ f
                best = (med, AlignedRotations(aligned, g, flipped, side, torch.rad2deg(err)))
    return best[1]


def fit_3d_offset(found_px: torch.Tensor, reference_px: torch.Tensor, rots: torch.Tensor) -> torch.Tensor:
    """Least-squares 3D offset c (3,) pixels with ``found_i - reference_i ~ (R_i c)[:2]``.

    found_px, reference_px (N, 2) shifts (x, y) in pixels, rots (N, 3, 3) the poses of either set.
    """
    a = rots.to(torch.float64)[:, :2, :].reshape(-1, 3)  # (2N, 3): rows of R_i acting on c
    d = (found_px.to(torch.float64) - reference_px.to(torch.float64)).reshape(-1, 1)
    return torch.linalg.lstsq(a, d).solution[:, 0]


def shift_errors(found_px: torch.Tensor, reference_px: torch.Tensor, rots: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) pixel distances between found and reference shifts (N, 2).

    With ``rots`` (N, 3, 3) the least-squares global 3D offset of the reconstruction
    (:func:`fit_3d_offset`) is removed first: it shows up as pose-dependent shift offsets
    ``(R_i c)[:2]``, not as a constant. Without, the shifts are compared as they are.
    """
    diff = found_px.to(torch.float64) - reference_px.to(torch.float64)
    if rots is not None:
        c = fit_3d_offset(found_px, reference_px, rots)
        diff = diff - (rots.to(torch.float64) @ c)[:, :2]
    return diff.norm(dim=-1)


def summary(errors: torch.Tensor) -> dict[str, float]:
    """Median, 90th percentile and mean of (N,) errors (nan for none)."""
    e = errors.to(torch.float64).flatten()
    if e.numel() == 0:
        return {"median": math.nan, "p90": math.nan, "mean": math.nan}
    return {"median": float(e.median()), "p90": float(torch.quantile(e, 0.9)), "mean": float(e.mean())}
