"""Image formation and the VAE loss (docs/conventions.md "Model and loss").

The observed image goes through: contrast inversion (x -1, ``data.invert``), the real-space
soft window, the centred Hartley transform, symmetrisation to (D+1)^2, the lattice mask
([half, mirror] order), division by the Hartley std, and a phase shift by ``trans * D``
pixels that re-centres the particle. The model predicts the Hartley slice, which is
multiplied by the CTF and compared with that by a masked mean squared error; the KL term
of the VAE is added with weight ``beta / n_masked``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from distdrgn.ctf import ctf_for_images
from distdrgn.errors import DistdrgnError
from distdrgn.fft import ht2_center, symmetrize_ht, window_mask
from distdrgn.lattice import Lattice, translate_ht


@dataclass(frozen=True)
class Preprocess:
    """How raw images become normalised Hartley values; stored with the model."""

    D: int
    invert: bool = True
    window: bool = True
    window_inner: float = 0.85
    window_outer: float = 0.99
    ht_std: float = 1.0


@lru_cache(maxsize=32)
def _on_device(kind: str, D: int, device: torch.device, dtype: torch.dtype | None, *args) -> torch.Tensor:
    """Constant per-box tensors (window, mask indices, frequencies) kept on the device.

    Moving them on every step would add a host-to-device copy (and a sync) per batch.
    """
    if kind == "window":
        t = window_mask(D, *args)
    elif kind == "mask":
        t = Lattice(D).mask_indices
    else:  # "freqs"
        t = Lattice(D).masked_freqs
    return t.to(device) if dtype is None else t.to(device, dtype)


def masked_freqs_on(D: int, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(n_masked, 2) frequencies (cycles/pixel) of the masked lattice points, cached on ``device``."""
    return _on_device("freqs", D, device, dtype)


def masked_hartley(images: torch.Tensor, prep: Preprocess, lattice: Lattice) -> torch.Tensor:
    """(B, D, D) real images -> (B, n_masked) normalised Hartley values, [half, mirror] order.

    Not yet translated; see :func:`translate_ht`. Computed in float32 (or float64 if given).
    """
    x = images if images.dtype == torch.float64 else images.float()
    if prep.invert:
        x = -x
    if prep.window:
        x = x * _on_device("window", prep.D, x.device, x.dtype, prep.window_inner, prep.window_outer)
    ht = symmetrize_ht(ht2_center(x)).flatten(-2)
    return ht[..., _on_device("mask", lattice.D, ht.device, None)] / prep.ht_std


def hartley_std(images: torch.Tensor, prep: Preprocess) -> float:
    """Std (mean taken as 0) of the symmetrised Hartley transforms of (k, D, D) images.

    All (D+1)^2 points are used, as the normalisation is defined on the whole image.
    """
    x = images.double()
    if prep.window:
        x = x * window_mask(prep.D, prep.window_inner, prep.window_outer).double()
    ht = symmetrize_ht(ht2_center(x))
    return float(torch.sqrt(torch.mean(ht * ht)))


@dataclass
class Batch:
    """One training batch on a device. indices index the store (store order)."""

    indices: torch.Tensor  # (B,) int64
    images: torch.Tensor  # (B, D, D) real space, the store's dtype (float32 or float16)
    rots: torch.Tensor  # (B, 3, 3)
    trans: torch.Tensor | None  # (B, 2) fraction of the box
    ctf: torch.Tensor | None  # (B, 9) ctf.pkl rows

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        def mv(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(*(mv(t) for t in (self.indices, self.images, self.rots, self.trans, self.ctf)))


@dataclass
class Targets:
    """What the loss compares: observed values, CTF, and the encoder's input."""

    y: torch.Tensor  # (B, n_masked) translated, normalised observed Hartley values
    ctf: torch.Tensor | None  # (B, n_masked) CTF at the masked points
    y_enc: torch.Tensor  # (B, n_masked) encoder input = y * sign(ctf)


def within(targets: Targets, weight: torch.Tensor) -> Targets:
    """Targets whose error only counts where ``weight`` (n_masked,) is 1: observed values and
    CTF multiplied by it (a CTF of ones when there is none), the encoder's input untouched."""
    ctf = weight.expand_as(targets.y) if targets.ctf is None else targets.ctf * weight
    return Targets(y=targets.y * weight, ctf=ctf, y_enc=targets.y_enc)


def prepare_targets(batch: Batch, prep: Preprocess, lattice: Lattice) -> Targets:
    """Observed images of a batch -> translated Hartley values, CTF and encoder input."""
    y = masked_hartley(batch.images, prep, lattice)
    freqs = masked_freqs_on(lattice.D, y.device, y.dtype)
    if batch.trans is not None:
        y = translate_ht(y, freqs, batch.trans.to(y.dtype) * prep.D)
    ctf = None
    y_enc = y
    if batch.ctf is not None:
        # float64 for the phase: at 3-5 um defocus the CTF argument is ~1e3 rad at Nyquist
        ctf = ctf_for_images(batch.ctf.double(), masked_freqs_on(lattice.D, y.device), prep.D).to(y.dtype)
        y_enc = y * torch.sign(ctf)
    return Targets(y=y, ctf=ctf, y_enc=y_enc)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per image: (B, zdim) -> (B,), summed over zdim."""
    return -0.5 * torch.sum(1 + logvar - mu * mu - torch.exp(logvar), dim=-1)


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar to back-propagate (already weighted for the global batch)
    mse: torch.Tensor  # scalar: mean over this rank's images of the masked MSE
    kl: torch.Tensor  # scalar: mean over this rank's images of the KL (0 when zdim = 0)


def slice_mse(pred: torch.Tensor, y: torch.Tensor, ctf: torch.Tensor | None) -> torch.Tensor:
    """Per-image masked MSE ``mean_k (ctf * pred - y)^2``: (B, n_masked) each -> (B,).

    Computed in float32 (float64 if ``pred`` is) whatever the dtype of ``pred``.
    """
    recon = pred * ctf if ctf is not None else pred
    full = torch.float64 if pred.dtype == torch.float64 else torch.float32
    return torch.mean((recon.to(full) - y.to(full)) ** 2, dim=-1)


def per_image_loss(mse: torch.Tensor, kl: torch.Tensor, beta: float, n_masked: int) -> torch.Tensor:
    """The objective of one image, ``mse + beta * kl / n_masked`` (any matching shapes).

    The MSE is a mean over the n_masked lattice points, so dividing the KL by n_masked weighs
    it as cryoDRGN does (its loss sums the error of each point and the KL once per image).
    """
    return mse + beta * kl / n_masked


def loss_terms(
    mse: torch.Tensor,
    mu: torch.Tensor | None,
    logvar: torch.Tensor | None,
    beta: float,
    n_masked: int,
    weight: float = 1.0,
) -> LossTerms:
    """Per-image MSE (B,) + beta * KL / n_masked, summed over images and multiplied by ``weight``.

    With ``weight = W / B_global`` (W processes whose batches add to B_global images) DDP's
    gradient average equals the gradient of the mean over the global batch, even when batch
    sizes differ by rank.
    """
    per_image = mse
    if mu is not None:
        kl = kl_divergence(mu.to(mse.dtype), logvar.to(mse.dtype))
        per_image = per_image_loss(mse, kl, beta, n_masked)
    else:
        kl = torch.zeros_like(per_image)
    n = max(per_image.shape[0], 1)
    return LossTerms(
        loss=per_image.sum() * weight, mse=mse.sum().detach() / n, kl=kl.sum().detach() / n
    )


def vae_loss(
    pred: torch.Tensor,
    targets: Targets,
    mu: torch.Tensor | None,
    logvar: torch.Tensor | None,
    beta: float,
    weight: float = 1.0,
) -> LossTerms:
    """Masked MSE + beta * KL / n_masked of predicted slices pred (B, n_masked) (before the CTF)."""
    return loss_terms(slice_mse(pred, targets.y, targets.ctf), mu, logvar, beta, pred.shape[-1], weight)


def parse_beta(spec: float | str | None, zdim: int, source: str = "train.beta"):
    """A function epoch (float, fractional within an epoch) -> beta.

    ``None``: 1/zdim (cryoDRGN's default; 0 for zdim = 0). A number: constant.
    ``"linear:START:END:EPOCHS"``: START at epoch 0, linear to END at EPOCHS, END after.
    A numeric string (``"0.5"``) is a constant.
    """
    if spec is None:
        value = 1.0 / zdim if zdim else 0.0
        return lambda epoch: value
    if isinstance(spec, (int, float)):
        value = float(spec)
        return lambda epoch: value
    text = str(spec).strip()
    try:
        value = float(text)
        return lambda epoch: value
    except ValueError:
        pass
    parts = text.split(":")
    if parts[0] == "linear" and len(parts) == 4:
        try:
            start, end, span = float(parts[1]), float(parts[2]), float(parts[3])
        except ValueError:
            span = -1
        if span > 0:
            return lambda epoch: start + (end - start) * min(max(epoch / span, 0.0), 1.0)
    raise DistdrgnError(f"{source}: train.beta must be a number or linear:START:END:EPOCHS, got {spec!r}")

