"""Volumes from a trained model: load a run, evaluate V(k, z) on the 3D lattice, write .mrc.

The decoder is evaluated one z-plane of the (D+1)^3 lattice at a time (coordinates
``(j - D/2) / D`` for j = 0..D in each axis, axes ordered (z, y, x)), inside the sphere of
radius 0.5 (zero outside), multiplied back by the Hartley std, cropped to D^3 (the last
plane repeats the first, aliased frequency) and transformed to real space with
:func:`~distdrgn.fft.iht3_center`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distdrgn.checkpoint import load_weights, weights_path
from distdrgn.errors import DistdrgnError
from distdrgn.fft import iht3_center
from distdrgn.formats.mrc import write_mrc
from distdrgn.model import CryoDRGN, ModelInfo
from distdrgn.objective import Preprocess


@dataclass
class TrainedModel:
    """A model loaded from a run directory, with what is needed to use it."""

    model: CryoDRGN
    prep: Preprocess
    apix: float | None  # Angstrom/pixel of the training images (None if the store had none)
    epoch: int
    config: dict
    path: Path

    @property
    def D(self) -> int:
        return self.model.info.D

    @property
    def zdim(self) -> int:
        return self.model.zdim


def model_from_checkpoint(ckpt: dict, path: Path) -> TrainedModel:
    info = ModelInfo(**ckpt["model_info"])
    model = CryoDRGN(info)
    try:
        model.load_state_dict(ckpt["model_state_dict"])
    except RuntimeError as exc:
        raise DistdrgnError(f"{path}: weights do not match the recorded architecture ({str(exc).splitlines()[0]})") from None
    model.eval()
    store = ckpt.get("store") or {}
    return TrainedModel(model, Preprocess(**ckpt["preprocess"]), store.get("apix"), int(ckpt["epoch"]), ckpt.get("config", {}), path)


def load_model(run_dir: str | Path, epoch: int | None = None, device=None, config: str | Path | None = None) -> TrainedModel:
    """Load ``weights.pkl`` (or ``weights.<epoch>.pkl``) from a run directory, or a weights file.

    cryoDRGN 4.x run directories (or weights files with ``config``, a cryoDRGN config.yaml)
    load through :mod:`distdrgn.cryodrgn_run`.
    """
    from distdrgn import cryodrgn_run

    run_dir = Path(run_dir)
    if config is not None or cryodrgn_run.is_cryodrgn_run(run_dir):
        return cryodrgn_run.load_cryodrgn_run(run_dir, epoch, device=device, config=config)
    path = run_dir if run_dir.is_file() else weights_path(run_dir, epoch)
    trained = model_from_checkpoint(load_weights(path), path)
    if device is not None:
        trained.model.to(device)
    return trained


def latent_tensor(model: CryoDRGN, z, device) -> torch.Tensor | None:
    """``z`` (zdim values) as a (1, zdim) float32 tensor on ``device``; None for zdim = 0."""
    if not model.zdim:
        return None
    if z is None:
        raise DistdrgnError(f"the model has zdim={model.zdim}: give a latent z")
    zt = torch.as_tensor(np.asarray(z, dtype=np.float32).reshape(-1), device=device)
    if zt.numel() != model.zdim:
        raise DistdrgnError(f"z has {zt.numel()} values but the model has zdim={model.zdim}")
    return zt[None]


@torch.no_grad()
def eval_volume(trained: TrainedModel, z=None, D: int | None = None, device=None) -> np.ndarray:
    """(D, D, D) float32 real-space volume at latent ``z`` (zdim,) (None for zdim = 0).

    ``D`` (even, default the training box) evaluates the same frequency extent on a coarser
    or finer lattice; the voxel size then scales by ``D_train / D``.
    """
    if trained.config.get("format") == "cryodrgn" and (D is None or int(D) == trained.D):
        from distdrgn.cryodrgn_run import eval_cryodrgn_volume

        return eval_cryodrgn_volume(trained, z, device=device)
    model = trained.model
    D = trained.D if D is None else int(D)
    if D % 2 or D < 4:
        raise DistdrgnError(f"volume box must be even and >= 4, got {D}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    zt = latent_tensor(model, z, device)
    k = (torch.arange(D + 1, dtype=torch.float32, device=device) - D // 2) / D
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    plane_xy = torch.stack([kx.ravel(), ky.ravel()], -1)  # ((D+1)^2, 2)
    vol = torch.zeros((D + 1, D + 1, D + 1), dtype=torch.float32, device=device)
    for iz in range(D + 1):
        kz = k[iz]
        inside = (plane_xy * plane_xy).sum(-1) + kz * kz <= 0.25
        if not inside.any():
            continue
        pts = torch.cat([plane_xy[inside], kz.expand(int(inside.sum()), 1)], -1)[None]
        with torch.autocast(device.type, enabled=False):
            values = model.decoder.hartley(pts, zt)[0]
        plane = torch.zeros((D + 1) ** 2, dtype=torch.float32, device=device)
        plane[inside] = values.float()
        vol[iz] = plane.view(D + 1, D + 1)
    vol = vol[:-1, :-1, :-1] * trained.prep.ht_std
    return iht3_center(vol.double()).float().cpu().numpy()


def eval_volumes(
    trained: TrainedModel,
    zs: np.ndarray | None,
    out_dir: str | Path,
    *,
    D: int | None = None,
    apix: float | None = None,
    flip: bool = False,
    device=None,
    prefix: str = "vol_",
    progress=None,
    start_index: int = 0,
    invert: bool = False,
    low_pass: float | None = None,
    crop: int | None = None,
) -> list[Path]:
    """Write ``vol_000.mrc``, ... for each row of ``zs`` (n, zdim) (one volume if zdim = 0).

    The voxel size is ``apix`` if given, else the training pixel size scaled by
    ``D_train / D``. ``flip`` mirrors the volume along z (inverts the handedness); then
    ``invert`` negates it, ``low_pass`` (Angstrom) filters it and ``crop`` keeps the central
    box (:func:`~distdrgn.cryodrgn_run.postprocess_volume`, cryoDRGN's order). Files are
    numbered from ``start_index``.
    """
    from distdrgn.cryodrgn_run import postprocess_volume

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    D = trained.D if D is None else int(D)
    if apix is None and trained.apix:
        apix = trained.apix * trained.D / D
    rows = [None] if trained.zdim == 0 else list(np.asarray(zs, dtype=np.float32).reshape(-1, trained.zdim))
    paths = []
    for i, z in enumerate(rows):
        vol = eval_volume(trained, z, D=D, device=device)
        vol = postprocess_volume(vol, flip=flip, invert=invert, low_pass=low_pass, apix=apix or 1.0, crop=crop)
        path = out_dir / f"{prefix}{i + start_index:03d}.mrc"
        write_mrc(path, vol, apix or 1.0, is_volume=True)
        paths.append(path)
        if progress is not None:
            progress.update(1)
    return paths
