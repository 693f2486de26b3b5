"""Run-directory files: ``weights.N.pkl`` checkpoints, ``z.N.pkl`` latents (cryoDRGN layout)
and mid-epoch step checkpoints ``checkpoints/step.E.C.pkl``.

Epochs are numbered from 1, as cryoDRGN 4.3.1 numbers them: ``weights.1.pkl`` / ``z.1.pkl``
are written after the first epoch; the final ``weights.pkl`` / ``z.pkl`` are copies of the
last epoch's. Run directories of distdrgn 0.1 numbered files from 0 (``weights.0.pkl`` after
the first epoch); they are recognised by their ``config.yaml`` (no ``run_format``) and read
with the right epoch numbers (:func:`file_offset`), but not resumed. A step checkpoint is written during epoch ``E`` after ``C`` of its images were
consumed (``train.checkpoint_every_steps``); only the newest :data:`KEEP_STEP_CHECKPOINTS`
are kept. Every file is written to a temporary name in the same directory, fsynced and moved
into place with ``os.replace``, so a crash never leaves a truncated checkpoint under its
real name; a file damaged anyway (a full disk, a copy cut short) fails to load, and
:func:`load_latest` then falls back to the previous checkpoint, renaming the damaged file to
``NAME.corrupt``.

A checkpoint is a ``torch.save`` dict (loadable with ``weights_only=True``)::

    {"format": "distdrgn-weights", "version": 2, "epoch": N,
     "model_state_dict", "optimizer_state_dict", "scaler_state_dict",
     "model_info": ModelInfo fields, "preprocess": Preprocess fields,
     "config": resolved config dict, "store": {"path", "n", "D", "apix"},
     "subset": None or {"path", "n"} (data.ind)}

plus, in a step checkpoint, ``"position"``: a :class:`DataPosition` as a dict (the epoch,
the images of its global order consumed, the epoch's running loss totals over all ranks and
its seconds so far, for its loss.csv row). Version 1 checkpoints (distdrgn 0.1) number epochs
from 0; :func:`load_weights` returns them with 1-based epochs.
No RNG state is stored: the trainer reseeds before every step from (seed, epoch, consumed,
rank), so the data position determines the random numbers too. Files are created with the
user's umask (as ``open`` would), so colleagues sharing a project folder can read them.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distdrgn.errors import DistdrgnError, FormatError

FORMAT = "distdrgn-weights"
VERSION = 2
RUN_FORMAT = 2  # config.yaml's ``run_format``: 2 = epochs from 1, cryoDRGN's layer count
_WEIGHTS_RE = re.compile(r"^weights\.(\d+)\.pkl$")
_Z_RE = re.compile(r"^z\.(\d+)\.pkl$")
_STEP_RE = re.compile(r"^step\.(\d+)\.(\d+)\.pkl$")
STEP_DIR = "checkpoints"
KEEP_STEP_CHECKPOINTS = 2


@dataclass(frozen=True)
class DataPosition:
    """Where training stands: ``consumed`` images of epoch ``epoch``'s global order
    (:mod:`distdrgn.loader`), and that epoch's running totals so far: ``sums`` = image-weighted
    (loss, mse, kl) and the image count over all ranks, ``seconds`` of training."""

    epoch: int  # from 1
    consumed: int = 0
    sums: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    seconds: float = 0.0

    @classmethod
    def of_checkpoint(cls, ckpt: dict | None) -> DataPosition:
        """Where a run resumes from ``ckpt``: inside an epoch (a step checkpoint), at the
        start of the epoch after a ``weights.N.pkl``, or at epoch 1 without one."""
        if ckpt is None:
            return cls(1)
        if "position" in ckpt:
            p = ckpt["position"]
            return cls(int(p["epoch"]), int(p["consumed"]), tuple(float(v) for v in p["sums"]), float(p["seconds"]))
        return cls(int(ckpt["epoch"]) + 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sums": list(self.sums)}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> None:
    """Write ``path`` through a temporary file in its folder, fsync, rename: all or nothing.

    A failed write (a full disk, a quota) raises DistdrgnError and leaves the previous
    files as they were."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the user's umask like any file
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:  # make the rename itself durable
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and "inline_container" in str(exc)):
            # torch.save reports a short write as "[enforce fail at inline_container.cc] unexpected pos"
            free = shutil.disk_usage(path.parent).free
            why = "no space left on the device" if getattr(exc, "errno", None) == errno.ENOSPC or free < 1 << 20 \
                else str(exc).splitlines()[0]
            raise DistdrgnError(f"{path}: cannot write it ({why}; {free / 2**20:.0f} MiB free in {path.parent}); "
                                "the earlier files are intact: free space, then rerun the same command to "
                                "resume") from None
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
        raise DistdrgnError(f"{path}: not a distdrgn checkpoint (a cryoDRGN weights file is read from its run "
                            f"directory, with its config.yaml beside it)")
    if ckpt.get("version") == 1:  # distdrgn 0.1: 0-based epochs (its model_info has no layer_convention)
        ckpt["epoch"] = int(ckpt["epoch"]) + 1
        if "position" in ckpt:
            ckpt["position"]["epoch"] = int(ckpt["position"]["epoch"]) + 1
    elif ckpt.get("version") != VERSION:
        raise DistdrgnError(f"{path}: checkpoint version {ckpt.get('version')} is not supported (expected {VERSION})")
    return ckpt


def save_z(path: Path, z_mu: np.ndarray, z_logvar: np.ndarray | None) -> None:
    """cryoDRGN ``z.pkl``: pickle of z_mu then pickle of z_logvar, each (N, zdim) float32;
    z_mu alone when there is no posterior variance (an autodecoder's z, as cryoDRGN-AI writes)."""

    def write(fh):
        pickle.dump(np.asarray(z_mu, dtype=np.float32), fh)
        if z_logvar is not None:
            pickle.dump(np.asarray(z_logvar, dtype=np.float32), fh)

    _atomic_write(path, write)


def load_z(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(z_mu, z_logvar) from a z.pkl (z_logvar None if the file holds only one array)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            z_mu = pickle.load(fh)
            try:
                z_logvar = pickle.load(fh)
            except EOFError:
                z_logvar = None
    except FileNotFoundError:
        raise FormatError(f"{path}: latent file not found") from None
    except Exception as exc:  # unpickling garbage raises many different types
        raise FormatError(f"{path}: not a pickled latent array ({type(exc).__name__}: {exc})") from None
    return np.asarray(z_mu, dtype=np.float32), None if z_logvar is None else np.asarray(z_logvar, np.float32)


def file_offset(run_dir: Path) -> int:
    """How file numbers relate to epochs in ``run_dir``: epoch = N + offset for ``weights.N.pkl``.

    0 for distdrgn (``config.yaml`` with ``run_format``) and cryoDRGN run directories (its
    ``model_args``), 1 for distdrgn 0.1 ones (epochs numbered from 0). Without a config.yaml,
    a ``weights.0.pkl`` marks the old numbering.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        import yaml

        try:
            cfg = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError:
            cfg = {}
        if isinstance(cfg, dict) and ("run_format" in cfg or "model_args" in cfg):
            return 0
        return 1
    return 1 if (run_dir / "weights.0.pkl").is_file() else 0


def _numbered(run_dir: Path, regex: re.Pattern) -> list[int]:
    if not run_dir.is_dir():
        return []
    offset = file_offset(run_dir)
    return sorted(int(m.group(1)) + offset for m in (regex.match(p.name) for p in run_dir.iterdir()) if m)


def checkpoint_epochs(run_dir: Path) -> list[int]:
    """Sorted epochs (from 1) of the ``weights.N.pkl`` files in ``run_dir``."""
    return _numbered(Path(run_dir), _WEIGHTS_RE)


def z_epochs(run_dir: Path) -> list[int]:
    """Sorted epochs (from 1) of the ``z.N.pkl`` files in ``run_dir``."""
    return _numbered(Path(run_dir), _Z_RE)


def epoch_file(run_dir: Path, stem: str, epoch: int) -> Path:
    """``STEM.N.pkl`` holding ``epoch`` (1-based) in ``run_dir``, whatever its numbering."""
    return Path(run_dir) / f"{stem}.{epoch - file_offset(run_dir)}.pkl"


def weights_path(run_dir: Path, epoch: int | None = None) -> Path:
    """The weights of ``epoch`` (from 1), or the final ``weights.pkl`` (else the latest)."""
    run_dir = Path(run_dir)
    if epoch is not None:
        return epoch_file(run_dir, "weights", epoch)
    final = run_dir / "weights.pkl"
    if final.is_file():
        return final
    epochs = checkpoint_epochs(run_dir)
    if not epochs:
        raise DistdrgnError(f"{run_dir}: no weights.pkl or weights.N.pkl (not a training run directory?)")
    return epoch_file(run_dir, "weights", epochs[-1])


# ---- resuming: step checkpoints and the latest readable checkpoint -----------------------


def step_checkpoint_path(run_dir: Path, epoch: int, consumed: int) -> Path:
    return Path(run_dir) / STEP_DIR / f"step.{epoch}.{consumed}.pkl"


def resume_points(run_dir: Path) -> list[tuple[tuple[int, int], Path]]:
    """``((epoch, consumed), path)`` of every checkpoint to resume from, newest first.

    The weights of epoch N resume at ``(N + 1, 0)``; ``checkpoints/step.E.C.pkl`` at ``(E, C)``.
    """
    run_dir = Path(run_dir)
    points = [((n + 1, 0), epoch_file(run_dir, "weights", n)) for n in checkpoint_epochs(run_dir)]
    step_dir = run_dir / STEP_DIR
    if step_dir.is_dir():
        for p in step_dir.iterdir():
            m = _STEP_RE.match(p.name)
            if m:
                points.append(((int(m.group(1)), int(m.group(2))), p))
    # at equal positions prefer weights.N.pkl (its z.N.pkl was written too)
    return sorted(points, key=lambda kp: (kp[0], kp[1].name.startswith("weights")), reverse=True)


def load_latest(run_dir: Path, warn=None, quarantine: bool = True) -> tuple[dict[str, Any] | None, Path | None]:
    """The newest checkpoint of ``run_dir`` that loads, and its path; (None, None) if none.

    An unreadable one is reported through ``warn(message)`` and, with ``quarantine``,
    renamed to ``NAME.corrupt`` so that it is neither retried nor counted as the newest.
    """
    for _, path in resume_points(run_dir):
        try:
            return load_weights(path), path
        except DistdrgnError as exc:
            if warn is not None:
                warn(f"{exc}; using the previous checkpoint")
            if quarantine:
                os.replace(path, path.with_name(path.name + ".corrupt"))
    return None, None


def save_step_checkpoint(run_dir: Path, position: DataPosition, payload: dict[str, Any]) -> Path:
    """Write ``checkpoints/step.E.C.pkl`` for ``position`` atomically and delete all but the
    newest :data:`KEEP_STEP_CHECKPOINTS` step checkpoints."""
    path = step_checkpoint_path(run_dir, position.epoch, position.consumed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(path, {**payload, "epoch": position.epoch, "position": position.to_dict()})
    steps = [p for _, p in resume_points(run_dir) if p.parent.name == STEP_DIR]
    for old in steps[KEEP_STEP_CHECKPOINTS:]:
        old.unlink(missing_ok=True)
    return path


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete ``.NAME...tmp`` files left by writers that were killed; returns them."""
    run_dir = Path(run_dir)
    removed = []
    for d in (run_dir, run_dir / STEP_DIR):
        if d.is_dir():
            for p in d.iterdir():
                if p.name.startswith(".") and ".tmp" in p.name and p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed
