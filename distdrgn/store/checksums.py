"""Checksums used by the store: crc32c of chunk values and sampled fingerprints of source files.

crc32c comes from ``google_crc32c`` (a dependency of zarr, hardware-accelerated where the CPU
supports it), the same function zarr uses for its shard-index checksums.
"""

from __future__ import annotations

import os
from pathlib import Path

import google_crc32c
import numpy as np

# Source files are fingerprinted, not fully hashed: size + mtime + crc32c of FINGERPRINT_BLOCKS
# blocks of FINGERPRINT_BLOCK_BYTES spread evenly over the file (first and last included).
# Constant cost per file (64 KiB read) on any file system, so a dataset split over 10^4
# micrograph stacks is fingerprinted quickly; files up to 1 MiB (metadata) are hashed in full.
FINGERPRINT_BLOCKS = 16
FINGERPRINT_BLOCK_BYTES = 4096
FULL_HASH_BYTES = 1 << 20


def crc32c_array(a: np.ndarray) -> int:
    """crc32c of the little-endian C-order bytes of ``a`` (independent of the store's codec)."""
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return int(google_crc32c.value(a.reshape(-1).view(np.uint8)))


def chunk_crc32c(values: np.ndarray, chunk_images: int) -> list[int]:
    """(k, D, D) values starting at a chunk boundary -> crc32c of each chunk's slice."""
    return [crc32c_array(values[i : i + chunk_images]) for i in range(0, len(values), chunk_images)]


def file_fingerprint(path: str | os.PathLike) -> dict:
    """{"path", "size", "mtime", "crc32c_sampled"} of a file (see module docstring)."""
    path = Path(path).resolve()
    st = path.stat()
    size = st.st_size
    crc = 0
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            while block := f.read(1 << 20):
                crc = google_crc32c.extend(crc, block)
        else:
            last = size - FINGERPRINT_BLOCK_BYTES
            for i in range(FINGERPRINT_BLOCKS):
                f.seek(last * i // (FINGERPRINT_BLOCKS - 1))
                crc = google_crc32c.extend(crc, f.read(FINGERPRINT_BLOCK_BYTES))
    return {"path": str(path), "size": size, "mtime": st.st_mtime, "crc32c_sampled": f"{crc:08x}"}
