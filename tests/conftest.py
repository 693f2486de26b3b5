"""Shared fixtures: one small simulated dataset and its particle store (session scoped)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. It must be chosen before
# any kernel module is imported (triton.jit reads it when it decorates).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

D_SMALL = 16
N_SMALL = 192
CHUNK_IMAGES = 32


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> dict[str, Path]:
    """simulate(n=192, D=16) + ingest into a store with 6 chunks of 32 images."""
    from distdrgn.simulate import simulate
    from distdrgn.store import ingest

    root = tmp_path_factory.mktemp("small")
    paths = simulate(root / "sim", n=N_SMALL, D=D_SMALL, snr=1.0, seed=0, progress=False, write_volumes=False)
    store = ingest(
        paths["particles.mrcs"], root / "store", poses=paths["poses.pkl"], ctf=paths["ctf.pkl"], progress=False,
        layout_overrides={"target_chunk_bytes": D_SMALL * D_SMALL * 4 * CHUNK_IMAGES},
    )
    return {"root": root, "store": Path(store), **paths}


def _tiny_overrides(store: Path, out: Path, **extra) -> list[str]:
    base = {
        "data.store": str(store),
        "output.dir": str(out),
        "model.zdim": 2,
        "model.enc_dim": 32,
        "model.enc_layers": 2,
        "model.dec_dim": 32,
        "model.dec_layers": 2,
        "train.epochs": 2,
        "train.batch_size": 16,
        "train.lr": 1e-3,
        "train.device": "cpu",
        "train.analyze": False,  # tests that want the closing analysis ask for it
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_overrides():
    """``f(store, out, **extra) -> ["key=value", ...]``: a seconds-long CPU training run."""
    return _tiny_overrides
