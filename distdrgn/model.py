"""The cryoDRGN model: image encoder, positional encodings, coordinate decoder, and the VAE.

Shapes use B = batch, P = points, n_masked/n_half from :class:`~distdrgn.lattice.Lattice`.
Coordinates are in cycles per pixel, spanning [-0.5, 0.5] (docs/conventions.md).

Layers are counted as cryoDRGN 4.3.1 counts them (``--enc-layers`` / ``--dec-layers`` L):
an MLP of L layers of width H is ``in -> H``, then L hidden layers ``H -> H`` (residual in the
decoder and the ``resid`` encoder), then ``H -> out``; ReLU after the input and every hidden
layer. Run directories of distdrgn 0.1 counted the input layer among the L
(``ModelInfo.layer_convention == "distdrgn-0.1"``: L - 1 hidden layers); they still load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from distdrgn.config import ModelConfig
from distdrgn.errors import DistdrgnError
from distdrgn.lattice import Lattice, rotate_coords
from distdrgn.objective import slice_mse


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    """Outputs of autocast regions back to float32; float32/float64 pass through."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


# ---------------------------------------------------------------------------------------
# Positional encodings
# ---------------------------------------------------------------------------------------


def geometric_frequencies(pe_type: str, n: int, D: int) -> torch.Tensor:
    """(n,) angular frequencies omega_i (radians per unit of coordinate) of a ladder.

    With t_i = i / (n - 1) (t = 0 when n = 1) and coordinates k in [-0.5, 0.5]:

    - ``geom_ft``:      omega_i = 2 pi (D/2)^t_i     geometric from 2 pi (one period over the
      whole lattice) to pi D (the phase ramp of a point at the box edge, r = D/2 pixels);
    - ``geom_full``:    omega_i = pi D^t_i           geometric from pi to pi D (one more octave
      at the low end);
    - ``geom_lowf``:    omega_i = 2 pi (D/4)^t_i     geometric from 2 pi to pi D / 2 (stops an
      octave below the box edge);
    - ``geom_nohighf``: omega_i = pi (D/2)^t_i       geometric from pi to pi D / 2;
    - ``linear_lowf``:  omega_i = pi D (i + 1) / (2 n)  linear from pi D / (2 n) to pi D / 2.
    """
    i = torch.arange(n, dtype=torch.float64)
    t = i / (n - 1) if n > 1 else torch.zeros(1, dtype=torch.float64)
    if pe_type == "geom_ft":
        w = 2 * math.pi * (D / 2) ** t
    elif pe_type == "geom_full":
        w = math.pi * float(D) ** t
    elif pe_type == "geom_lowf":
        w = 2 * math.pi * (D / 4) ** t
    elif pe_type == "geom_nohighf":
        w = math.pi * (D / 2) ** t
    elif pe_type == "linear_lowf":
        w = math.pi * D * (i + 1) / (2 * n)
    else:
        raise ValueError(f"not a geometric positional encoding: {pe_type}")
    return w.float()


class PositionalEncoding(nn.Module):
    """Fixed sinusoidal features of 3D coordinates: (..., 3) -> (..., out_dim).

    - ``gaussian``: a fixed (3 pe_dim, 3) matrix F of frequencies drawn from
      N(0, feat_sigma^2) and scaled by D/2 (a buffer drawn from ``seed``); features are
      ``[sin(k @ F^T), cos(k @ F^T)]``, out_dim = 6 pe_dim (= 3 D for pe_dim = D/2).
    - geometric ladders (:func:`geometric_frequencies`, n = pe_dim angular frequencies
      omega): features ``[sin(omega_i k_c), cos(omega_i k_c)]`` for each coordinate
      c in (x, y, z), ordered sin then cos, each (c, i) row-major; out_dim = 6 pe_dim.
    - ``none``: the raw coordinates, out_dim = 3.
    """

    def __init__(self, pe_type: str, pe_dim: int, D: int, feat_sigma: float = 0.5, seed: int = 0):
        super().__init__()
        self.pe_type = pe_type
        self.pe_dim = pe_dim
        if pe_type == "gaussian":
            gen = torch.Generator().manual_seed(seed)
            freqs = torch.randn((3 * pe_dim, 3), generator=gen, dtype=torch.float32) * feat_sigma * (D / 2)
            self.register_buffer("freqs", freqs)
            self.out_dim = 6 * pe_dim
        elif pe_type == "none":
            self.register_buffer("freqs", torch.zeros(0))
            self.out_dim = 3
        else:
            self.register_buffer("freqs", geometric_frequencies(pe_type, pe_dim, D))
            self.out_dim = 6 * pe_dim

    def frequency_matrix(self) -> torch.Tensor:
        """(3 pe_dim, 3) float32 F with phases ``k @ F^T`` in :meth:`forward`'s feature order.

        Gaussian: the drawn frequencies. Geometric: row ``c n + i`` is omega_i times the unit
        vector of coordinate c (one non-zero per row, so the phases are bit-identical).
        """
        if self.pe_type == "none":
            raise ValueError("the 'none' positional encoding has no frequencies")
        if self.pe_type == "gaussian":
            return self.freqs
        eye = torch.eye(3, dtype=self.freqs.dtype, device=self.freqs.device)
        return (eye[:, None, :] * self.freqs[None, :, None]).reshape(3 * self.pe_dim, 3)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        if self.pe_type == "none":
            return coords
        # at least fp32 phases: they reach tens of radians, far too coarse in bf16
        x = _full_precision(coords)
        freqs = self.freqs.to(x.dtype)
        with torch.autocast(coords.device.type, enabled=False):
            if self.pe_type == "gaussian":
                phase = x @ freqs.T
            else:
                phase = (x[..., :, None] * freqs).flatten(-2)  # (..., 3 n), c-major
            return torch.cat([torch.sin(phase), torch.cos(phase)], -1)


# ---------------------------------------------------------------------------------------
# MLPs
# ---------------------------------------------------------------------------------------


class MLP(nn.Module):
    """``in -> H`` then ``n_hidden`` layers ``H -> H`` (optionally residual) then ``H -> out``."""

    def __init__(self, in_dim: int, hidden: int, n_hidden: int, out_dim: int, residual: bool):
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_hidden))
        self.out = nn.Linear(hidden, out_dim)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        for layer in self.hidden:
            h = torch.relu(h + layer(h)) if self.residual else torch.relu(layer(h))
        return self.out(h)


class Encoder(nn.Module):
    """(B, n_masked) normalised Hartley values -> z_mu (B, zdim), z_logvar (B, zdim)."""

    def __init__(self, n_in: int, hidden: int, n_hidden: int, zdim: int, residual: bool):
        super().__init__()
        self.zdim = zdim
        self.mlp = MLP(n_in, hidden, n_hidden, 2 * zdim, residual)

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.mlp(y)
        return out[:, : self.zdim], out[:, self.zdim :]


def canonicalize(coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map 3D points into one half-space: (..., 3) -> (coords', flipped (...,) bool).

    A point is flipped to ``-k`` when k_z > 0, or k_z = 0 and k_y > 0, or k_z = k_y = 0 and
    k_x > 0; so ``k`` and ``-k`` always map to the same point and the Fourier decoder's
    output obeys ``F(-k) = conj F(k)`` exactly.
    """
    kx, ky, kz = coords.unbind(-1)
    flip = (kz > 0) | ((kz == 0) & ((ky > 0) | ((ky == 0) & (kx > 0))))
    return torch.where(flip[..., None], -coords, coords), flip


class Decoder(nn.Module):
    """Coordinate MLP V(k, z): positional encoding of k, concatenated with z, residual MLP.

    ``domain='fourier'``: outputs (real, imag) of the Fourier transform at the canonical
    point (:func:`canonicalize`); the Hartley value is ``real - imag`` at k and
    ``real + imag`` at -k. ``domain='hartley'``: one real output, the Hartley value itself.
    """

    def __init__(self, pe: PositionalEncoding, zdim: int, hidden: int, n_hidden: int, domain: str):
        super().__init__()
        self.pe = pe
        self.zdim = zdim
        self.domain = domain
        self.mlp = MLP(pe.out_dim + zdim, hidden, n_hidden, 2 if domain == "fourier" else 1, residual=True)

    def _features(self, coords: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        feats = self.pe(coords)
        if self.zdim:
            zb = z[:, None, :].to(feats.dtype).expand(*coords.shape[:-1], self.zdim)
            feats = torch.cat([feats, zb], -1)
        return feats

    def fourier(self, coords: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hermitian-consistent (real, imag) at (B, P, 3) coords -> two (B, P) tensors."""
        canon, flip = canonicalize(coords)
        out = _full_precision(self.mlp(self._features(canon, z)))
        real, imag = out[..., 0], out[..., 1]
        return real, torch.where(flip, -imag, imag)

    def hartley_pairs(self, coords: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fourier domain: Hartley values at (B, P, 3) coords k and at -k, two (B, P)."""
        real, imag = self.fourier(coords, z)
        return real - imag, real + imag

    def hartley(self, coords: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Hartley values at (B, P, 3) coords -> (B, P) (all points evaluated)."""
        if self.domain == "fourier":
            return self.hartley_pairs(coords, z)[0]
        return _full_precision(self.mlp(self._features(coords, z))[..., 0])

    def slices(
        self, lattice: Lattice, rots: torch.Tensor, z: torch.Tensor | None, coords: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predicted Hartley slices at the masked lattice points, [half, mirror] order.

        rots (B, 3, 3), z (B, zdim) or None -> (B, n_masked). The Fourier domain evaluates
        only the ``half`` points and fills the ``mirror`` half by conjugate symmetry.
        ``coords``: the (n_masked, 3) masked lattice coordinates, if already on the device.
        """
        if coords is None:
            coords = lattice.coords[lattice.mask_indices]
        return self.slices_at(coords, lattice.n_half, rots, z)

    def slices_at(self, coords: torch.Tensor, n_half: int, rots: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """:meth:`slices` from the (n_masked, 3) masked coordinates and n_half (no Lattice:
        what ``torch.compile`` traces). rots (B, 3, 3), z (B, zdim) or None -> (B, n_masked)."""
        coords = coords.to(rots.device)  # (n_masked, 3); no copy when already there
        if self.domain == "fourier":
            h_pos, h_neg = self.hartley_pairs(rotate_coords(coords[:n_half], rots), z)  # (B, n_half) each
            return torch.cat([h_pos, h_neg], -1)
        return self.hartley(rotate_coords(coords, rots), z)

    def fused_slice_mse(
        self, half_coords: torch.Tensor, rots: torch.Tensor, z: torch.Tensor | None, y: torch.Tensor,
        ctf: torch.Tensor | None, act_dtype: torch.dtype,
    ) -> torch.Tensor:
        """:func:`~distdrgn.objective.slice_mse` of :meth:`slices` through the fused kernels.

        half_coords (n_half, 3), rots (B, 3, 3), z (B, zdim) or None, y and ctf (B, n_masked)
        -> (B,) float32. Same parameters and the same function as the reference path, with
        the hidden activations in ``act_dtype`` (bf16 under autocast).
        """
        from distdrgn.kernels.backend import backend_sse
        from distdrgn.kernels.frontend import frontend
        from distdrgn.kernels.residual import residual_layer

        B, P = rots.shape[0], half_coords.shape[0]
        freqs = self.pe.frequency_matrix()
        n_pe = 2 * freqs.shape[0]
        weight, bias = self.mlp.inp.weight, self.mlp.inp.bias
        with torch.autocast(rots.device.type, enabled=False):
            if self.zdim:
                zb = torch.nn.functional.linear(z.float(), weight[:, n_pe:].float(), bias.float())  # (B, H)
            else:
                zb = bias.float().expand(B, -1)
            h = frontend(half_coords, rots, freqs, weight[:, :n_pe], zb, act_dtype)  # (B, P, H)
            h = h.view(B * P, -1)
            for layer in self.mlp.hidden:
                h = residual_layer(h, layer.weight, layer.bias)
            sse = backend_sse(h.view(B, P, -1), self.mlp.out.weight, self.mlp.out.bias, half_coords, rots, y, ctf)
        return sse / (2 * P)


# ---------------------------------------------------------------------------------------
# The VAE
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """Everything needed to rebuild a model: box size and resolved hyper-parameters."""

    D: int
    zdim: int
    encoder: str
    enc_dim: int
    enc_layers: int
    dec_dim: int
    dec_layers: int
    pe_type: str
    pe_dim: int
    feat_sigma: float
    domain: str
    seed: int
    # how enc_layers / dec_layers were counted: "cryodrgn" (L hidden H -> H layers, as
    # cryoDRGN's --enc-layers/--dec-layers) or "distdrgn-0.1" (L - 1; the input layer counted).
    # Checkpoints written before the field existed are read as "distdrgn-0.1".
    layer_convention: str = "distdrgn-0.1"

    @property
    def enc_hidden(self) -> int:
        """Number of H -> H hidden layers of the encoder."""
        return self.enc_layers - (self.layer_convention == "distdrgn-0.1")

    @property
    def dec_hidden(self) -> int:
        """Number of residual H -> H hidden layers of the decoder."""
        return self.dec_layers - (self.layer_convention == "distdrgn-0.1")

    @classmethod
    def from_config(cls, cfg: ModelConfig, D: int, seed: int) -> "ModelInfo":
        return cls(
            D=D,
            zdim=cfg.zdim,
            encoder=cfg.encoder,
            enc_dim=cfg.enc_dim,
            enc_layers=cfg.enc_layers,
            dec_dim=cfg.dec_dim,
            dec_layers=cfg.dec_layers,
            pe_type=cfg.pe_type,
            pe_dim=cfg.pe_dim if cfg.pe_dim is not None else D // 2,
            feat_sigma=cfg.feat_sigma,
            domain=cfg.domain,
            seed=seed,
            layer_convention="cryodrgn",
        )


class CryoDRGN(nn.Module):
    """Encoder (absent when zdim = 0, and for an autodecoder, whose z are per-particle rows of
    :class:`distdrgn.particle_table.ParticleTable`) + decoder on the lattice of box D."""

    def __init__(self, info: ModelInfo):
        super().__init__()
        self.info = info
        self.lattice = Lattice(info.D)
        # parameters from a private generator: every rank and every resume builds the same model
        fork_devices: list = []
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(info.seed)
            self.encoder = (
                Encoder(self.lattice.n_masked, info.enc_dim, info.enc_hidden, info.zdim, info.encoder == "resid")
                if info.zdim > 0 and info.encoder != "autodecoder"
                else None
            )
            pe = PositionalEncoding(info.pe_type, info.pe_dim, info.D, info.feat_sigma, seed=info.seed)
            self.decoder = Decoder(pe, info.zdim, info.dec_dim, info.dec_hidden, info.domain)
        # moves with the model, so a training step does not copy it to the device
        self.register_buffer("slice_coords", self.lattice.coords[self.lattice.mask_indices], persistent=False)
        # the decoder path of forward(): "torch" (reference), "fused" (distdrgn.kernels) or
        # "compile" (the reference through torch.compile); see distdrgn.kernels.resolve_kernels
        self.kernels = "torch"

    @property
    def zdim(self) -> int:
        return self.info.zdim

    def encode(self, y_enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n_masked) encoder input -> z_mu, z_logvar, each (B, zdim) float32."""
        mu, logvar = self.encoder(y_enc)
        return _full_precision(mu), _full_precision(logvar)

    def _latent(self, y_enc, sample: bool):
        """(z, mu, logvar); all None when zdim = 0. ``sample``: z = mu + exp(logvar / 2) * eps."""
        if not self.zdim:
            return None, None, None
        if self.encoder is None:
            raise DistdrgnError("this model has no image encoder (model.encoder=autodecoder): its z are the "
                                "particles' rows of the run's z.pkl, not computed from images")
        mu, logvar = self.encode(y_enc)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        return z, mu, logvar

    def forward(
        self, rots: torch.Tensor, y_enc: torch.Tensor | None, sample: bool = True, *,
        y: torch.Tensor, ctf: torch.Tensor | None = None, z: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The training path: (per-image MSE (B,) float32, z_mu, z_logvar).

        rots (B, 3, 3), y_enc (B, n_masked) encoder input (None when zdim = 0), the observed
        values ``y`` and the CTF (each (B, n_masked); ctf None = no CTF). The MSE is
        :func:`~distdrgn.objective.slice_mse` of the predicted slices, through the decoder path
        ``self.kernels``. z_mu and z_logvar are (B, zdim), or None when zdim = 0. ``sample``
        draws z = mu + exp(logvar / 2) * eps (training); otherwise z = mu. ``z`` (B, zdim): an
        autodecoder's rows, used as they are (no encoder, no KL: mu and logvar are None).
        Called through the DDP / DeepSpeed wrapper, so that their hooks see it.
        """
        z, mu, logvar = (z, None, None) if z is not None else self._latent(y_enc, sample)
        if self.kernels == "fused":
            act_dtype = torch.get_autocast_dtype(rots.device.type) if torch.is_autocast_enabled(rots.device.type) \
                else torch.float32
            half = self.slice_coords[: self.lattice.n_half]
            return self.decoder.fused_slice_mse(half, rots, z, y, ctf, act_dtype), mu, logvar
        if self.kernels == "compile":
            return compiled_slice_mse()(self.decoder, self.slice_coords, self.lattice.n_half, rots, z, y, ctf), mu, logvar
        return reference_slice_mse(self.decoder, self.slice_coords, self.lattice.n_half, rots, z, y, ctf), mu, logvar

    def slices(
        self, rots: torch.Tensor, y_enc: torch.Tensor | None = None, sample: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Evaluation: (predicted slices (B, n_masked) [half, mirror] order, z_mu, z_logvar).

        Always the reference decoder (the fused kernels compute the loss, not the slices).
        z_mu and z_logvar are (B, zdim), or None when zdim = 0; ``sample`` as in :meth:`forward`.
        """
        z, mu, logvar = self._latent(y_enc, sample)
        return self.decoder.slices(self.lattice, rots, z, self.slice_coords), mu, logvar


def reference_slice_mse(decoder: Decoder, coords: torch.Tensor, n_half: int, rots: torch.Tensor,
                        z: torch.Tensor | None, y: torch.Tensor, ctf: torch.Tensor | None) -> torch.Tensor:
    """Per-image MSE (B,) of the decoder's slices (:meth:`Decoder.slices_at`) against ``y``.

    coords (n_masked, 3), rots (B, 3, 3), z (B, zdim) or None, y and ctf (B, n_masked)."""
    return slice_mse(decoder.slices_at(coords, n_half, rots, z), y, ctf)


_COMPILED: dict[str, object] = {}


def compiled_slice_mse():
    """:func:`reference_slice_mse` through ``torch.compile`` (inductor), compiled on first use.

    One compiled function for the process; torch.compile guards on the decoder, the shapes
    and the autocast state, and recompiles when they change (a new batch size: the ragged last
    batch of an epoch, once). ``dynamic=False``: fixed shapes give inductor's best kernels.
    Only PyTorch operations are in the graph (no custom autograd functions to break it).
    """
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(reference_slice_mse, dynamic=False)
    return _COMPILED["fn"]


def build_model(cfg: ModelConfig, D: int, seed: int) -> CryoDRGN:
    return CryoDRGN(ModelInfo.from_config(cfg, D, seed))
