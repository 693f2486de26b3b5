"""A pseudo-atomic test particle with a hinge motion and an optional subunit.

The particle is a sum of isotropic 3D Gaussians ("atoms") scattered uniformly inside three
ellipsoidal domains:

* ``core``: a flattened ellipsoid, fixed;
* ``arm``: an elongated domain joined to the core at a hinge; conformation ``c`` in [0, 1]
  rotates it rigidly by ``c * max_angle_deg`` about the hinge axis (c = 0 open, c = 1 closed);
* ``subunit``: a small globular domain bound to the core, present or absent (composition).

Atom positions are stored in box fractions (x, y, z) about the box centre, so one model
describes the same object at any box size ``D``: in pixels the positions are scaled by ``D``
and the particle spans about 60% of the box. The atom width is ``sigma_px(D) =
max(1, 0.01 D)`` pixels, wide enough that sampling on the pixel grid does not alias.

Because every atom is a Gaussian, the 3D Fourier transform is analytic:
``V^(q) = sum_a w_a (2 pi s^2)^(3/2) exp(-2 pi^2 s^2 |q|^2) exp(-2 pi i q . mu_a)`` for ``q`` in
cycles/pixel and ``mu_a`` in pixels relative to the box centre (voxel ``D/2``). Real-space
rendering (:func:`render_volume`) and Fourier evaluation (:func:`gaussian_ft`) describe the
same function, so the centred DFT of the rendered volume matches :func:`gaussian_ft` at
lattice points up to the (tiny) aliasing of the Gaussian tails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


@dataclass(frozen=True)
class Domain:
    """An ellipsoid filled with atoms: centre and semi-axes in box fractions, atom count."""

    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    n_atoms: int


CORE = Domain(centre=(0.0, -0.05, 0.0), semi_axes=(0.24, 0.16, 0.17), n_atoms=800)
ARM = Domain(centre=(0.1, 0.17, 0.0), semi_axes=(0.07, 0.13, 0.08), n_atoms=350)
SUBUNIT = Domain(centre=(-0.06, -0.22, 0.1), semi_axes=(0.09, 0.075, 0.09), n_atoms=250)
HINGE_POINT = (0.1, 0.06, 0.0)
HINGE_AXIS = (0.2, 0.0, 1.0)  # normalised on use; tilted off z so the motion is not in-plane only
MAX_ANGLE_DEG = 60.0


def sigma_px(D: int) -> float:
    """Atom Gaussian standard deviation in pixels at box size D."""
    return max(1.0, 0.01 * D)


def _fill_ellipsoid(domain: Domain, rng: np.random.Generator) -> np.ndarray:
    """(n_atoms, 3) positions drawn uniformly inside the domain's ellipsoid (rejection sampling)."""
    centre = np.asarray(domain.centre)
    axes = np.asarray(domain.semi_axes)
    pts = np.empty((0, 3))
    while len(pts) < domain.n_atoms:
        u = rng.uniform(-1.0, 1.0, size=(2 * domain.n_atoms, 3))
        pts = np.concatenate([pts, u[np.sum(u * u, axis=1) <= 1.0]])
    return centre + pts[: domain.n_atoms] * axes


@dataclass(frozen=True)
class PseudoAtomicModel:
    """Atom positions (box fractions, (x, y, z)) and weights of the three domains, plus the hinge."""

    core: np.ndarray  # (n_core, 3)
    arm: np.ndarray  # (n_arm, 3)
    subunit: np.ndarray  # (n_sub, 3)
    weights: np.ndarray  # (n_core + n_arm + n_sub,) atom amplitudes, in [core, arm, subunit] order
    hinge_point: np.ndarray  # (3,)
    hinge_axis: np.ndarray  # (3,) unit vector
    max_angle_deg: float
    seed: int

    @property
    def n_atoms(self) -> int:
        return len(self.weights)

    def hinge_rotations(self, c: torch.Tensor) -> torch.Tensor:
        """(B,) conformations -> (B, 3, 3) rotations of the arm (Rodrigues), float64."""
        c = torch.as_tensor(c, dtype=torch.float64).reshape(-1)
        theta = c * math.radians(self.max_angle_deg)
        k = torch.tensor(self.hinge_axis, dtype=torch.float64)
        K = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]], dtype=torch.float64)
        eye = torch.eye(3, dtype=torch.float64)
        s, co = torch.sin(theta)[:, None, None], torch.cos(theta)[:, None, None]
        return eye + s * K + (1 - co) * (K @ K)

    def atoms(self, c, subunit, D: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Atoms of B particles in conformations ``c`` (B,) with ``subunit`` (B,) bool/0-1.

        Returns positions (B, A, 3) in pixels (x, y, z) relative to the box centre and weights
        (B, A); an absent subunit keeps its atoms with weight 0, so A is the same for all.
        """
        c = torch.as_tensor(c, dtype=torch.float64).reshape(-1)
        present = torch.as_tensor(subunit).reshape(-1).to(torch.float64)
        B = c.shape[0]
        R = self.hinge_rotations(c)  # (B, 3, 3)
        hinge = torch.tensor(self.hinge_point, dtype=torch.float64)
        arm = torch.tensor(self.arm, dtype=torch.float64)
        arm = (arm - hinge) @ R.transpose(1, 2) + hinge  # rotate column vectors: R (p - h) + h
        core = torch.tensor(self.core, dtype=torch.float64).expand(B, -1, -1)
        sub = torch.tensor(self.subunit, dtype=torch.float64).expand(B, -1, -1)
        pos = torch.cat([core, arm, sub], dim=1) * D
        w = torch.tensor(self.weights, dtype=torch.float64).expand(B, -1).clone()
        w[:, self.n_atoms - len(self.subunit) :] *= present[:, None]
        return pos.to(device=device, dtype=dtype), w.to(device=device, dtype=dtype)


@lru_cache(maxsize=8)
def pseudo_atomic_model(seed: int = 0) -> PseudoAtomicModel:
    """The test particle, deterministic for a given ``seed`` (independent of box size)."""
    rng = np.random.default_rng(seed)
    core, arm, sub = (_fill_ellipsoid(d, rng) for d in (CORE, ARM, SUBUNIT))
    weights = rng.uniform(0.7, 1.3, size=len(core) + len(arm) + len(sub))
    axis = np.asarray(HINGE_AXIS, dtype=np.float64)
    for a in (core, arm, sub, weights):
        a.setflags(write=False)
    return PseudoAtomicModel(
        core=core,
        arm=arm,
        subunit=sub,
        weights=weights,
        hinge_point=np.asarray(HINGE_POINT, dtype=np.float64),
        hinge_axis=axis / np.linalg.norm(axis),
        max_angle_deg=MAX_ANGLE_DEG,
        seed=seed,
    )


def gaussian_ft(
    q: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor, sigma: float, max_elements: int = 1 << 24
) -> torch.Tensor:
    """Analytic 3D Fourier transform of a sum of Gaussians at points ``q``.

    q: (B, P, 3) frequencies (x, y, z) in cycles/pixel; positions: (B, A, 3) pixels relative
    to the box centre; weights: (B, A); sigma: pixels. Returns (B, P) complex
    ``sum_a w_a (2 pi sigma^2)^(3/2) exp(-2 pi^2 sigma^2 |q|^2) exp(-2 pi i q . mu_a)``,
    the continuous transform, which the centred DFT of the sampled volume equals (up to
    aliasing). Atoms are processed in chunks of at most ``max_elements`` phases at a time.
    """
    B, P, _ = q.shape
    A = positions.shape[1]
    chunk = max(1, max_elements // max(B * P, 1))
    re = torch.zeros(B, P, dtype=q.dtype, device=q.device)
    im = torch.zeros(B, P, dtype=q.dtype, device=q.device)
    for s in range(0, A, chunk):
        phase = (2 * math.pi) * torch.bmm(q, positions[:, s : s + chunk].transpose(1, 2))  # (B, P, a)
        w = weights[:, s : s + chunk, None]  # (B, a, 1)
        re += torch.bmm(torch.cos(phase), w).squeeze(-1)
        im -= torch.bmm(torch.sin(phase), w).squeeze(-1)
    envelope = (2 * math.pi * sigma**2) ** 1.5 * torch.exp(-2 * math.pi**2 * sigma**2 * q.square().sum(-1))
    return torch.complex(re * envelope, im * envelope)


def slice_ft(
    kx: torch.Tensor, ky: torch.Tensor, rots: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor, sigma: float
) -> torch.Tensor:
    """Analytic central slices: :func:`gaussian_ft` at ``q = [k_x, k_y, 0] @ R`` on a (k_y, k_x) grid.

    kx: (Kx,), ky: (Ky,) cycles/pixel; rots: (B, 3, 3); positions: (B, A, 3) pixels; weights:
    (B, A). Returns (B, Ky, Kx) complex. Since ``q . mu = k . (R mu)`` and ``|q| = |k|``, the
    phase factors over each atom separate into an x part and a y part, so the sum over atoms
    is a batched matrix product (the 2D transform of the projected Gaussians).
    """
    dt = positions.dtype
    p = torch.bmm(positions, rots.to(dt).transpose(1, 2))  # (B, A, 3): rows are R mu
    two_pi = 2 * math.pi
    ex = torch.polar(torch.ones((), dtype=dt, device=p.device), -two_pi * p[..., 0:1] * kx.to(dt))  # (B, A, Kx)
    ey = torch.polar(torch.ones((), dtype=dt, device=p.device), -two_pi * p[..., 1:2] * ky.to(dt))  # (B, A, Ky)
    ey = ey * weights.to(dt)[..., None]
    f = torch.bmm(ey.transpose(1, 2), ex)  # (B, Ky, Kx)
    k2 = ky.to(dt)[:, None] ** 2 + kx.to(dt)[None, :] ** 2
    envelope = (2 * math.pi * sigma**2) ** 1.5 * torch.exp(-2 * math.pi**2 * sigma**2 * k2)
    return f * envelope


def render_volume(positions: torch.Tensor, weights: torch.Tensor, sigma: float, D: int) -> torch.Tensor:
    """Sum of Gaussians on the voxel grid: (A, 3) pixel positions (x, y, z), (A,) weights -> (D, D, D) [z, y, x].

    Voxel ``(i_z, i_y, i_x)`` sits at ``(i_x - D/2, i_y - D/2, i_z - D/2)`` pixels. Gaussians are
    separable, so each atom contributes an outer product of three 1D profiles.
    """
    pos = positions.to(torch.float64)
    w = weights.to(torch.float64)
    grid = torch.arange(D, dtype=torch.float64, device=pos.device) - D // 2
    out = torch.zeros(D * D, D, dtype=torch.float64, device=pos.device)
    chunk = max(1, (1 << 24) // (D * D))
    for s in range(0, pos.shape[0], chunk):
        p = pos[s : s + chunk]
        g = torch.exp(-((grid[None, :, None] - p[:, None, :]) ** 2) / (2 * sigma**2))  # (a, D, 3)
        gx, gy, gz = g[..., 0], g[..., 1], g[..., 2]
        zy = (w[s : s + chunk, None, None] * gz[:, :, None] * gy[:, None, :]).reshape(-1, D * D)  # (a, D*D)
        out += zy.T @ gx
    return out.view(D, D, D).to(torch.float32)


def model_volume(model: PseudoAtomicModel, c: float, subunit: bool, D: int) -> torch.Tensor:
    """Real-space (D, D, D) [z, y, x] float32 volume of the model in one state."""
    pos, w = model.atoms(torch.tensor([float(c)]), torch.tensor([bool(subunit)]), D, dtype=torch.float64)
    return render_volume(pos[0], w[0], sigma_px(D), D)
