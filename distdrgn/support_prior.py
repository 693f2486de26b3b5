"""A real-space support prior for ab initio: the particle's density lies within a sphere.

While the poses are still being found, the data constrain the decoder only on the central
sections the images have been assigned to so far; elsewhere in Fourier space it is free, and
it can grow values there that no image is fitted against. The next search then avoids those
regions and crowds the images into fewer viewing directions still, until the map no longer
fixes any pose (the collapse measured in benchmarks/RESULTS.md). A particle is compact in real
space, and that couples every Fourier region to every other: values that make density outside
the particle are wrong wherever they are. RELION and cryoSPARC mask their ab initio maps by the
particle diameter for the same reason.

The prior is the fraction of the decoded map's energy (the sum of its squared density) that
lies outside a sphere of ``support_radius`` box widths about the centre, computed from the
decoder's values within the search radius (the frequencies the loss compares). The
denominator is held fixed in the gradient, so the prior lowers the density outside and never
rewards more density inside. It is scale-free: a weight of 1 weighs a map with all its energy
outside like an image fitted with an MSE of 1 (normalised units).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distdrgn.pose_search import decoded_ball


def density_from_ball(values: torch.Tensor) -> torch.Tensor:
    """Real-space density of Hartley values on a centred odd grid: (n_vol, G, G, G) -> (n_vol,
    G, G, G), centred, up to a constant factor (the Hartley transform is its own inverse).

    A spherical mask about the centre does not depend on the sign convention of the transform
    (it maps x to -x at most), so none is needed here.
    """
    dims = (-3, -2, -1)
    f = torch.fft.fftn(torch.fft.ifftshift(values, dim=dims), dim=dims)
    return torch.fft.fftshift(f.real - f.imag, dim=dims)


def outside_mask(G: int, period_px: float, support_radius_px: float, device) -> torch.Tensor:
    """(G, G, G) float32, 1 where a voxel of a centred real-space grid of G voxels spanning
    ``period_px`` pixels lies further than ``support_radius_px`` pixels from the centre."""
    x = (torch.arange(G, device=device, dtype=torch.float32) - G // 2) * (period_px / G)
    r2 = x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2
    return (r2 > support_radius_px**2).float()


def outside_energy_fraction(density: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """sum(density^2 outside) / sum(density^2), the denominator detached: (n_vol, G, G, G),
    (G, G, G) -> 0-d, the mean over volumes."""
    energy = density * density
    total = energy.sum(dim=(-3, -2, -1)).detach().clamp_min(torch.finfo(energy.dtype).tiny)
    return ((energy * outside).sum(dim=(-3, -2, -1)) / total).mean()


@dataclass
class SupportPrior:
    """The prior for one epoch: ``weight`` x the outside-energy fraction of the map decoded
    within lattice ``radius`` of a D box, outside ``support_radius`` box widths."""

    weight: float
    radius: float
    D: int
    support_radius: float

    def __call__(self, decoder, z: torch.Tensor | None) -> torch.Tensor:
        """0-d, differentiable in the decoder. ``z``: None (zdim = 0) or (V, zdim), the latents
        of the V volumes it is averaged over (held fixed: the prior trains the decoder only)."""
        values, n = decoded_ball(decoder, self.radius, self.D, None if z is None else z.detach(), oversample=1)
        G = values.shape[-1]
        no_dc = torch.ones_like(values)
        no_dc[:, n, n, n] = 0  # no image measures the mean (the 2D lattice leaves out DC): not the prior's to set
        values = values * no_dc
        # grid spacing 1 / D cycles/pixel: the inverse transform spans the box, D pixels
        outside = outside_mask(G, self.D, self.support_radius * self.D, values.device)
        return self.weight * outside_energy_fraction(density_from_ball(values), outside)
