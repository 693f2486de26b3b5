"""Simulated heterogeneous particle datasets with ground truth (``distdrgn simulate``).

Each image is formed exactly as docs/conventions.md prescribes, from the analytic Fourier transform
of the pseudo-atomic model in :mod:`distdrgn.atoms` (no interpolation):

1. draw the particle's state (conformation ``c``, subunit present or not; see :data:`DISTRIBUTIONS`),
   a uniform random rotation ``R``, a Gaussian in-plane offset ``trans`` (fraction of the box)
   and CTF parameters;
2. evaluate the centred transform of the projection at ``k`` as the model's 3D transform at
   ``[k_x, k_y, 0] @ R`` (the image is the projection along z of ``V(R^T x)``);
3. multiply by the CTF (:func:`distdrgn.ctf.ctf_for_images`);
4. move the particle by ``-trans * D`` pixels (so moving the observed image by ``+trans * D``,
   as :func:`distdrgn.lattice.translate_ht` does, re-centres it);
5. invert the contrast (real extracted stacks have white particles; the default ``-1`` data
   inversion of training then restores the positive density) and add white Gaussian noise.

SNR is ``var(signal) / var(noise)``, where var(signal) is the mean over images of the pixel
variance of the noiseless, CTF-modulated, shifted image over the whole D x D box, estimated
on a pilot set of :data:`PILOT_IMAGES` images drawn like the dataset (its own random stream).
The noise standard deviation is the same for every image.
"""

from __future__ import annotations

import json
import math
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from distdrgn import __version__
from distdrgn.atoms import PseudoAtomicModel, pseudo_atomic_model, model_volume, sigma_px, slice_ft
from distdrgn.ctf import ctf_for_images
from distdrgn.errors import DistdrgnError
from distdrgn.lattice import random_rotations

DISTRIBUTIONS = {
    "uniform": "c ~ U(0, 1); subunit present with probability 0.5, independently of c",
    "cooperative": "c ~ U(0, 1); subunit present exactly when c >= 0.5 (bound only in the closed half)",
    "discrete": "c drawn uniformly from n_states equally spaced values in [0, 1]; subunit present with p = 0.5",
    "homogeneous": "one state for every image: c = 0.5, subunit present (for testing reconstruction)",
}
PILOT_IMAGES = 256
DEFAULT_BOX_ANGSTROM = 192.0


@dataclass(frozen=True)
class SimulationParams:
    """Every setting of a simulation (written to ``simulation.json``)."""

    n: int
    D: int
    snr: float
    dist: str = "uniform"
    apix: float | None = None  # None: DEFAULT_BOX_ANGSTROM / D
    seed: int = 0
    model_seed: int = 0
    n_states: int = 5
    shift_std_px: float = 2.0
    dfu_min: float = 10000.0  # Angstrom
    dfu_max: float = 25000.0
    max_astigmatism: float = 0.1  # dfv = dfu * (1 - U(0, max_astigmatism))
    kv: float = 300.0
    cs: float = 2.7
    w: float = 0.1
    phase_shift: float = 0.0
    batch_size: int = 256

    def validate(self) -> "SimulationParams":
        if self.n < 1:
            raise DistdrgnError(f"--n must be at least 1, got {self.n}")
        if self.D < 8 or self.D % 2:
            raise DistdrgnError(f"-D must be an even box size >= 8, got {self.D}")
        if not self.snr > 0:
            raise DistdrgnError(f"--snr must be positive (inf for no noise), got {self.snr}")
        if self.dist not in DISTRIBUTIONS:
            raise DistdrgnError(f"--dist must be one of {', '.join(DISTRIBUTIONS)}, got {self.dist!r}")
        if self.apix is not None and not self.apix > 0:
            raise DistdrgnError(f"--apix must be positive, got {self.apix}")
        if self.n_states < 2:
            raise DistdrgnError(f"n_states must be at least 2, got {self.n_states}")
        if self.batch_size < 1:
            raise DistdrgnError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.shift_std_px >= 0:
            raise DistdrgnError(f"--shift-std must be >= 0 pixels, got {self.shift_std_px}")
        return self

    @property
    def pixel_size(self) -> float:
        return float(self.apix) if self.apix is not None else DEFAULT_BOX_ANGSTROM / self.D


# ----------------------------------------------------------------------------- random draws


def draw_states(n: int, dist: str, n_states: int, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image ground truth (c (n,) float64 in [0, 1], subunit (n,) bool, state (n,) int64).

    ``state`` is the index of c's value for ``discrete`` and the bin ``floor(c * n_states)``
    (clipped to n_states - 1) for the others.
    """
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    coin = torch.rand(n, generator=gen, dtype=torch.float64) < 0.5
    if dist == "homogeneous":
        c = torch.full((n,), 0.5, dtype=torch.float64)
        coin = torch.ones(n, dtype=torch.bool)
        state = torch.clamp((c * n_states).long(), max=n_states - 1)
    elif dist == "discrete":
        state = torch.randint(0, n_states, (n,), generator=gen)
        c = state.to(torch.float64) / (n_states - 1)
    else:
        c = u
        state = torch.clamp((c * n_states).long(), max=n_states - 1)
    subunit = (c >= 0.5) if dist == "cooperative" else coin
    return c.numpy(), subunit.numpy(), state.numpy().astype(np.int64)


def draw_ctf(n: int, p: SimulationParams, gen: torch.Generator) -> np.ndarray:
    """(n, 9) float32 ctf.pkl rows: dfu ~ U(dfu_min, dfu_max), dfv = dfu (1 - U(0, max_astig)), angle ~ U(0, 180)."""
    r = torch.rand(n, 3, generator=gen, dtype=torch.float64).numpy()
    dfu = p.dfu_min + (p.dfu_max - p.dfu_min) * r[:, 0]
    dfv = dfu * (1.0 - p.max_astigmatism * r[:, 1])
    ang = 180.0 * r[:, 2]
    cols = [np.full(n, p.D), np.full(n, p.pixel_size), dfu, dfv, ang, np.full(n, p.kv), np.full(n, p.cs),
            np.full(n, p.w), np.full(n, p.phase_shift)]  # fmt: skip
    return np.stack(cols, axis=1).astype(np.float32)


@dataclass
class ParticleMeta:
    """Per-image metadata of a simulated dataset (all numpy, length n)."""

    rots: np.ndarray  # (n, 3, 3) float32
    trans: np.ndarray  # (n, 2) float32, fraction of the box
    ctf: np.ndarray  # (n, 9) float32
    c: np.ndarray  # (n,) float64
    subunit: np.ndarray  # (n,) bool
    state: np.ndarray  # (n,) int64


def draw_metadata(n: int, p: SimulationParams, gen: torch.Generator) -> ParticleMeta:
    c, subunit, state = draw_states(n, p.dist, p.n_states, gen)
    rots = random_rotations(n, gen).numpy().astype(np.float32)
    trans = (torch.randn(n, 2, generator=gen, dtype=torch.float64).numpy() * p.shift_std_px / p.D).astype(np.float32)
    ctf = draw_ctf(n, p, gen)
    return ParticleMeta(rots=rots, trans=trans, ctf=ctf, c=c, subunit=subunit, state=state)


# ----------------------------------------------------------------------------- image formation


def _half_freqs(D: int, device) -> torch.Tensor:
    """(D * (D/2 + 1), 2) float64 (k_x, k_y) cycles/pixel of the rfft2 layout (rows fftfreq, columns rfftfreq)."""
    ky = torch.fft.fftfreq(D, dtype=torch.float64, device=device)
    kx = torch.fft.rfftfreq(D, dtype=torch.float64, device=device)
    gy, gx = torch.meshgrid(ky, kx, indexing="ij")
    return torch.stack([gx.ravel(), gy.ravel()], -1)


def clean_images(
    model: PseudoAtomicModel,
    D: int,
    rots: torch.Tensor,
    trans: torch.Tensor | None,
    ctf: torch.Tensor | None,
    c: torch.Tensor,
    subunit: torch.Tensor,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Noiseless images (B, D, D) float32 with positive density (contrast not inverted).

    rots (B, 3, 3), trans (B, 2) box fractions or None, ctf (B, 9) rows or None, c (B,), subunit (B,).
    The slice is evaluated analytically (:func:`distdrgn.atoms.slice_ft`) on the rfft2 half-plane
    (rows ``fftfreq(D)``, columns ``rfftfreq(D)``) and inverted with irfft2;
    the real-space centre is moved to pixel (D/2, D/2) by an fftshift.
    """
    device = torch.device(device)
    B = rots.shape[0]
    freqs = _half_freqs(D, device)  # (P, 2)
    kx = torch.fft.rfftfreq(D, dtype=torch.float64, device=device)
    ky = torch.fft.fftfreq(D, dtype=torch.float64, device=device)
    pos, w = model.atoms(c, subunit, D, device=device, dtype=torch.float32)
    f = slice_ft(kx, ky, rots.to(device), pos, w, sigma_px(D)).reshape(B, -1).to(torch.complex128)  # (B, P)
    if ctf is not None:
        f = f * ctf_for_images(ctf.to(device, torch.float64), freqs, D)
    if trans is not None:
        phase = 2 * math.pi * (trans.to(device, torch.float64) * D) @ freqs.T  # + sign: image moved by -trans*D
        f = f * torch.polar(torch.ones_like(phase), phase)
    img = torch.fft.irfft2(f.view(B, D, D // 2 + 1), s=(D, D))
    return torch.fft.fftshift(img, dim=(-2, -1)).to(torch.float32)


def _device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def estimate_signal_variance(model: PseudoAtomicModel, p: SimulationParams, device) -> float:
    """Mean per-image pixel variance of noiseless images, over a pilot set drawn like the data."""
    gen = torch.Generator().manual_seed(p.seed + 7919)  # a stream apart from the dataset's
    meta = draw_metadata(PILOT_IMAGES, p, gen)
    var = []
    for s in range(0, PILOT_IMAGES, p.batch_size):
        sl = slice(s, s + p.batch_size)
        img = clean_images(model, p.D, torch.from_numpy(meta.rots[sl]), torch.from_numpy(meta.trans[sl]),
                           torch.from_numpy(meta.ctf[sl]), torch.from_numpy(meta.c[sl]),
                           torch.from_numpy(meta.subunit[sl]), device)  # fmt: skip
        var.append(img.to(torch.float64).var(dim=(-2, -1), unbiased=False).cpu())
    return float(torch.cat(var).mean())


# ----------------------------------------------------------------------------- ground truth


def ground_truth_volume(c: float, subunit: bool, D: int, model_seed: int = 0) -> np.ndarray:
    """Ground-truth density (D, D, D) float32 [z, y, x], centre at voxel D/2, for one state.

    The positive density: the sign that back-projection recovers from the simulated images
    after the usual ``-1`` data inversion.
    """
    return model_volume(pseudo_atomic_model(model_seed), c, subunit, D).numpy()


@dataclass
class GroundTruth:
    """Ground truth of a simulated dataset directory: per-image states and a volume renderer."""

    params: SimulationParams
    c: np.ndarray
    subunit: np.ndarray
    state: np.ndarray

    def volume(self, c: float, subunit: bool, D: int | None = None) -> np.ndarray:
        """(D, D, D) float32 ground-truth volume (default: the dataset's box)."""
        return ground_truth_volume(c, subunit, D or self.params.D, self.params.model_seed)

    def image_volume(self, i: int, D: int | None = None) -> np.ndarray:
        """Ground-truth volume of the particle in image ``i``."""
        return self.volume(float(self.c[i]), bool(self.subunit[i]), D)


def load_ground_truth(out: str | Path) -> GroundTruth:
    """Read ``simulation.json`` and ``ground_truth.pkl`` of a simulation directory."""
    out = Path(out)
    try:
        info = json.loads((out / "simulation.json").read_text())
        with open(out / "ground_truth.pkl", "rb") as f:
            gt = pickle.load(f)
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        raise DistdrgnError(f"{out}: not a readable simulation directory ({exc})") from None
    params = SimulationParams(**info["params"])
    return GroundTruth(params=params, c=gt["c"], subunit=gt["subunit"].astype(bool), state=gt["state"])


# ----------------------------------------------------------------------------- the dataset


def _write_volumes(out: Path, model: PseudoAtomicModel, p: SimulationParams) -> list[dict]:
    from distdrgn.formats.mrc import write_mrc

    vdir = out / "volumes"
    vdir.mkdir(exist_ok=True)
    entries = []
    for s, c in enumerate(np.linspace(0.0, 1.0, p.n_states)):
        for sub in (False, True):
            name = f"state{s}_c{c:.3f}_{'with' if sub else 'without'}_subunit.mrc"
            write_mrc(vdir / name, model_volume(model, float(c), sub, p.D).numpy(), apix=p.pixel_size, is_volume=True)
            entries.append({"file": name, "c": float(c), "subunit": sub, "state": s})
    (vdir / "index.json").write_text(json.dumps({"apix": p.pixel_size, "D": p.D, "volumes": entries}, indent=1))
    return entries


def _write_star(path: Path, meta: ParticleMeta, p: SimulationParams) -> None:
    from distdrgn.formats.poses import rot_to_euler
    from distdrgn.formats.star import write_star

    euler = rot_to_euler(meta.rots)
    n = len(meta.rots)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnVoltage": [p.kv],
            "rlnSphericalAberration": [p.cs],
            "rlnAmplitudeContrast": [p.w],
            "rlnImagePixelSize": [p.pixel_size],
            "rlnImageSize": [p.D],
            "rlnImageDimensionality": [2],
        }
    )
    # cryoDRGN's trans is the RELION origin divided by the box (no sign change).
    origin_a = meta.trans.astype(np.float64) * p.D * p.pixel_size
    particles = pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(n)],
            "rlnAngleRot": euler[:, 0],
            "rlnAngleTilt": euler[:, 1],
            "rlnAnglePsi": euler[:, 2],
            "rlnOriginXAngst": origin_a[:, 0],
            "rlnOriginYAngst": origin_a[:, 1],
            "rlnDefocusU": meta.ctf[:, 2].astype(np.float64),
            "rlnDefocusV": meta.ctf[:, 3].astype(np.float64),
            "rlnDefocusAngle": meta.ctf[:, 4].astype(np.float64),
            "rlnPhaseShift": meta.ctf[:, 8].astype(np.float64),
            "rlnOpticsGroup": np.ones(n, dtype=np.int64),
            "rlnClassNumber": meta.state + 1,
        }
    )
    write_star(path, particles, optics)


def simulate(
    out: str | Path,
    n: int,
    D: int,
    snr: float,
    dist: str = "uniform",
    apix: float | None = None,
    seed: int = 0,
    *,
    model_seed: int = 0,
    n_states: int = 5,
    shift_std_px: float = 2.0,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = True,
    write_volumes: bool = True,
    force: bool = False,
) -> dict[str, Path]:
    """Simulate ``n`` images of box ``D`` at ``snr`` into directory ``out``; returns the written paths.

    ``dist`` is one of :data:`DISTRIBUTIONS`; ``apix`` defaults to a 192 A box; ``seed`` fixes
    every random draw (same seed and settings give the same files). Images are generated in
    batches of ``batch_size`` on ``device`` (default: CUDA if available) and streamed to disk.
    Writes particles.mrcs, particles.star, poses.pkl, ctf.pkl, labels.pkl, ground_truth.pkl,
    volumes/ (with index.json) and simulation.json. A folder that already holds a
    simulation is refused unless ``force``.
    """
    from distdrgn.formats.ctf_params import save_ctf
    from distdrgn.formats.mrc import MrcStackWriter
    from distdrgn.formats.poses import save_poses

    p = SimulationParams(n=n, D=D, snr=float(snr), dist=dist, apix=apix, seed=seed, model_seed=model_seed,
                         n_states=n_states, shift_std_px=shift_std_px, batch_size=batch_size).validate()  # fmt: skip
    out = Path(out)
    if not force and any((out / name).exists() for name in ("particles.mrcs", "particles.star", "simulation.json")):
        raise DistdrgnError(f"{out}: already holds a simulated dataset; use --force to overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    dev = _device(device)
    model = pseudo_atomic_model(model_seed)
    t0 = time.time()

    gen = torch.Generator().manual_seed(seed)
    meta = draw_metadata(n, p, gen)
    noise_gen = torch.Generator().manual_seed(seed + 104729)
    signal_var = estimate_signal_variance(model, p, dev)
    noise_std = 0.0 if math.isinf(p.snr) else math.sqrt(signal_var / p.snr)

    paths = {name: out / name for name in ("particles.mrcs", "particles.star", "poses.pkl", "ctf.pkl",
                                           "labels.pkl", "ground_truth.pkl", "simulation.json")}  # fmt: skip
    with MrcStackWriter(paths["particles.mrcs"], n, D, p.pixel_size) as writer:
        bar = tqdm(total=n, desc="simulate", unit="img", disable=not progress)
        for s in range(0, n, batch_size):
            sl = slice(s, min(s + batch_size, n))
            img = clean_images(model, D, torch.from_numpy(meta.rots[sl]), torch.from_numpy(meta.trans[sl]),
                               torch.from_numpy(meta.ctf[sl]), torch.from_numpy(meta.c[sl]),
                               torch.from_numpy(meta.subunit[sl]), dev).cpu()  # fmt: skip
            img = -img  # inverted contrast, as in extracted stacks
            if noise_std > 0:
                img += noise_std * torch.randn(img.shape, generator=noise_gen)
            writer.write(img.numpy())
            bar.update(img.shape[0])
        bar.close()

    save_poses(paths["poses.pkl"], meta.rots, meta.trans)
    save_ctf(paths["ctf.pkl"], meta.ctf)
    labels = 2 * meta.state + meta.subunit.astype(np.int64)
    with open(paths["labels.pkl"], "wb") as f:
        pickle.dump(labels, f)
    with open(paths["ground_truth.pkl"], "wb") as f:
        pickle.dump({"c": meta.c.astype(np.float32), "subunit": meta.subunit.astype(np.int8),
                     "state": meta.state, "label": labels}, f)  # fmt: skip
    _write_star(paths["particles.star"], meta, p)
    volumes = _write_volumes(out, model, p) if write_volumes else []
    if write_volumes:
        paths["volumes"] = out / "volumes"

    info = {
        "software": f"distdrgn {__version__}",
        "params": p.__dict__,
        "pixel_size": p.pixel_size,
        "distribution": DISTRIBUTIONS[dist],
        "snr_definition": "mean per-image pixel variance of the noiseless CTF-modulated image / noise variance",
        "signal_variance": signal_var,
        "noise_std": noise_std,
        "contrast": "inverted (white particles): images = -(CTF * projection) + noise",
        "labels": "labels.pkl = 2 * state + subunit",
        "model": {
            "n_atoms": model.n_atoms,
            "n_subunit_atoms": len(model.subunit),
            "n_arm_atoms": len(model.arm),
            "atom_sigma_px": sigma_px(D),
            "hinge_axis": model.hinge_axis.tolist(),
            "hinge_point_box_fraction": model.hinge_point.tolist(),
            "max_hinge_angle_deg": model.max_angle_deg,
        },
        "volumes": volumes,
        "device": str(dev),
        "seconds": round(time.time() - t0, 2),
    }
    paths["simulation.json"].write_text(json.dumps(info, indent=1))
    return paths
