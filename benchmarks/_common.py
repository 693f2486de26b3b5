"""What the benchmark scripts share: the machine they ran on, and random particle inputs."""

from __future__ import annotations

import pickle
import platform
from pathlib import Path

import numpy as np


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def write_random_particles(root: Path, n: int, D: int, seed: int = 0) -> dict[str, Path]:
    """n random D x D float32 images as an .mrcs (written through a memory map, 64 MiB at a
    time), identity poses and one CTF row repeated: what a user hands to ``ingest``."""
    from distdrgn.formats.mrc import MrcStackWriter

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = {"mrcs": root / "particles.mrcs", "poses": root / "poses.pkl", "ctf": root / "ctf.pkl"}
    block = max(1, (64 << 20) // (D * D * 4))
    with MrcStackWriter(paths["mrcs"], n, D, apix=1.0) as writer:
        for i in range(0, n, block):
            writer.write(rng.standard_normal((min(block, n - i), D, D), dtype=np.float32))
    with open(paths["poses"], "wb") as fh:
        pickle.dump((np.broadcast_to(np.eye(3, dtype=np.float32), (n, 3, 3)).copy(), np.zeros((n, 2), np.float32)), fh)
    with open(paths["ctf"], "wb") as fh:
        pickle.dump(np.tile(np.array([D, 1.0, 15000, 14000, 30, 300, 2.7, 0.1, 0], np.float32), (n, 1)), fh)
    return paths
