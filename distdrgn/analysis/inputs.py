"""Where the analysis commands get their latents: a ``z.pkl`` file or a training run directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distdrgn.analysis import latent
from distdrgn.errors import DistdrgnError


@dataclass(frozen=True)
class LatentSource:
    """Latents and where they came from.

    z: (N, zdim) float32 latent means; z_path: the file read; run_dir: the training run
    directory when one was given (else None); analysis_dir: the default ``distdrgn
    analyze`` output directory of that epoch (``RUN_DIR/analyze.EPOCH``), or None.
    """

    z: np.ndarray
    z_path: Path
    run_dir: Path | None
    analysis_dir: Path | None


def load_latent_source(source: str | Path, epoch: int | None = None) -> LatentSource:
    """Read latents from ``source``: a z.pkl (``epoch`` must be None) or a run directory.

    For a run directory ``epoch`` selects ``z.EPOCH.pkl`` (from 1, negative from the end)
    as in ``distdrgn analyze``; None is the final ``z.pkl``.
    """
    from distdrgn.analysis.analyze import resolve_epoch

    source = Path(source)
    if source.is_dir():
        which = resolve_epoch(source, epoch)
        z = latent.load_z(which.z_path)
        return LatentSource(z, which.z_path, which.run_dir, which.run_dir / f"analyze.{which.label}")
    if epoch is not None:
        raise DistdrgnError(f"{source}: --epoch applies to a run directory, not to a latent file")
    return LatentSource(latent.load_z(source), source, None, None)


def save_latents_txt(path: str | Path, z: np.ndarray) -> None:
    """Write latents (M, zdim) as text, one row per point (the format ``eval-vol --zfile`` reads)."""
    np.savetxt(path, np.atleast_2d(np.asarray(z, dtype=np.float32)), fmt="%.7g")
