"""Small synthetic datasets for the store tests (mrcs written with mrcfile, pickles with pickle)."""

from __future__ import annotations

import pickle
from pathlib import Path

import mrcfile
import numpy as np


def random_rots(n: int, rng) -> np.ndarray:
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    R = np.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], axis=1).reshape(n, 3, 3)
    return R.astype(np.float32)


def make_dataset(tmp: Path, n: int = 200, D: int = 32, apix: float = 2.0, seed: int = 0, name: str = "p"):
    """Write ``name``.mrcs, poses.pkl and ctf.pkl under ``tmp``; return (paths dict, arrays dict)."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, D, D)).astype(np.float32)
    stack = tmp / f"{name}.mrcs"
    with mrcfile.new(stack, overwrite=True) as m:
        m.set_data(images)
        m.set_image_stack()
        m.voxel_size = apix
    rots = random_rots(n, rng)
    trans = rng.uniform(-0.05, 0.05, size=(n, 2)).astype(np.float32)
    ctf = np.zeros((n, 9), np.float32)
    ctf[:, 0], ctf[:, 1] = D, apix
    ctf[:, 2] = rng.uniform(10000, 20000, n)
    ctf[:, 3] = ctf[:, 2] - rng.uniform(0, 500, n)
    ctf[:, 4] = rng.uniform(0, 180, n)
    ctf[:, 5], ctf[:, 6], ctf[:, 7] = 300, 2.7, 0.1
    poses_path, ctf_path = tmp / "poses.pkl", tmp / "ctf.pkl"
    with open(poses_path, "wb") as f:
        pickle.dump((rots, trans), f)
    with open(ctf_path, "wb") as f:
        pickle.dump(ctf, f)
    return (
        {"stack": stack, "poses": poses_path, "ctf": ctf_path},
        {"images": images, "rots": rots, "trans": trans, "ctf": ctf},
    )


# chunks of 16 images of 32 px (64 KiB) in shards of 2 chunks: several shards even for 200 images
SMALL_LAYOUT = {"target_chunk_bytes": 16 * 32 * 32 * 4, "target_shard_bytes": 2 * 16 * 32 * 32 * 4}
