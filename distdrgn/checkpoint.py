"""Run-directory files: ``weights.N.pkl`` checkpoints and ``z.N.pkl`` latents (cryoDRGN layout).

``N`` is the 0-based index of the epoch just finished (``weights.0.pkl`` after the first
epoch), as in cryoDRGN; the final ``weights.pkl`` / ``z.pkl`` are copies of the last
epoch's. Every file is written to a temporary name in the same directory and moved into
place with ``os.replace``, so a crash never leaves a truncated checkpoint.

A checkpoint is a ``torch.save`` dict (loadable with ``weights_only=True``)::

    {"format": "distdrgn-weights", "version": 1, "epoch": N,
     "model_state_dict", "optimizer_state_dict", "scaler_state_dict",
     "model_info": ModelInfo fields, "preprocess": Preprocess fields,
     "config": resolved config dict, "rng": {"torch_cpu": [per rank], "torch_cuda": [per rank]},
     "store": {"path", "n", "D", "apix"}}
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distdrgn.errors import DistdrgnError

FORMAT = "distdrgn-weights"
VERSION = 1
_WEIGHTS_RE = re.compile(r"^weights\.(\d+)\.pkl$")


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_weights(path: Path, payload: dict[str, Any]) -> None:
    """Atomically ``torch.save`` a checkpoint dict (adds format and version)."""
    _atomic_write(path, lambda fh: torch.save({"format": FORMAT, "version": VERSION, **payload}, fh))


def load_weights(path: Path, map_location="cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_weights`; DistdrgnError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise DistdrgnError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt/foreign pickles
        raise DistdrgnError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise DistdrgnError(f"{path}: not a distdrgn checkpoint (cryoDRGN weights files are not supported)")
    if ckpt.get("version") != VERSION:
        raise DistdrgnError(f"{path}: checkpoint version {ckpt.get('version')} is not supported (expected {VERSION})")
    return ckpt


def save_z(path: Path, z_mu: np.ndarray, z_logvar: np.ndarray) -> None:
    """cryoDRGN ``z.pkl``: pickle of z_mu then pickle of z_logvar, each (N, zdim) float32."""

    def write(fh):
        pickle.dump(np.asarray(z_mu, dtype=np.float32), fh)
        pickle.dump(np.asarray(z_logvar, dtype=np.float32), fh)

    _atomic_write(path, write)


def load_z(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(z_mu, z_logvar) from a z.pkl (z_logvar None if the file holds only one array)."""
    path = Path(path)
    if not path.is_file():
        raise DistdrgnError(f"{path}: no such latent file")
    with open(path, "rb") as fh:
        try:
            z_mu = pickle.load(fh)
        except Exception as exc:
            raise DistdrgnError(f"{path}: cannot read latents ({type(exc).__name__})") from None
        try:
            z_logvar = pickle.load(fh)
        except EOFError:
            z_logvar = None
    return np.asarray(z_mu, dtype=np.float32), None if z_logvar is None else np.asarray(z_logvar, np.float32)


def checkpoint_epochs(run_dir: Path) -> list[int]:
    """Sorted epoch indices N of the ``weights.N.pkl`` files in ``run_dir``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = (_WEIGHTS_RE.match(p.name) for p in run_dir.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def weights_path(run_dir: Path, epoch: int | None = None) -> Path:
    """``weights.N.pkl`` for ``epoch``, or the final ``weights.pkl`` (else the latest N)."""
    run_dir = Path(run_dir)
    if epoch is not None:
        return run_dir / f"weights.{epoch}.pkl"
    final = run_dir / "weights.pkl"
    if final.is_file():
        return final
    epochs = checkpoint_epochs(run_dir)
    if not epochs:
        raise DistdrgnError(f"{run_dir}: no weights.pkl or weights.N.pkl (not a training run directory?)")
    return run_dir / f"weights.{epochs[-1]}.pkl"
