"""Integrity checks and summaries of a particle store (``distdrgn store verify|info``)."""

from __future__ import annotations

import numpy as np

from distdrgn.errors import StoreError
from distdrgn.store import layout as L
from distdrgn.store.checksums import crc32c_array
from distdrgn.store.reader import ParticleStore


def info(path) -> dict:
    """JSON-serialisable summary: counts, levels, layout, sizes on disk, norm, provenance."""
    store = ParticleStore.open(path)
    a = store.attrs
    size = sum(f.stat().st_size for f in store.path.rglob("*") if f.is_file())
    n_files = sum(1 for f in store.path.rglob("*") if f.is_file())
    return {
        "path": str(store.path),
        "format": a["format"],
        "version": a["version"],
        "n": store.n,
        "D": store.D,
        "apix": store.apix,
        "dtype": store.dtype.name,
        "codec": a.get("codec"),
        "levels": store.levels,
        "layout": a.get("layout"),
        "has_poses": bool(a.get("has_poses")),
        "has_ctf": bool(a.get("has_ctf")),
        "bytes_on_disk": size,
        "files": n_files,
        "norm": a.get("norm"),
        "source_D": a.get("source_D"),
        "source_apix": a.get("source_apix"),
        "kind": a.get("kind"),
        "created": a.get("created"),
        "provenance": a.get("provenance"),
    }


def verify(path, progress: bool = False) -> dict:
    """Recompute every chunk checksum and check shapes, dtypes and finiteness.

    Returns a summary dict; raises StoreError (one line, first problem found) otherwise.
    Reads the store one chunk at a time.
    """
    from tqdm import tqdm

    store = ParticleStore.open(path)
    a = store.attrs
    n = store.n
    checked = 0
    expected_meta = {L.ORIGINAL_INDEX: ((n,), np.int64)}
    if a.get("has_poses"):
        expected_meta[L.ROTS] = ((n, 3, 3), np.float32)
        expected_meta[L.TRANS] = ((n, 2), np.float32)
    if a.get("has_ctf"):
        expected_meta[L.CTF] = ((n, 9), np.float32)
    recorded = a.get("metadata_crc32c", {})
    for name, (shape, dtype) in expected_meta.items():
        values = store._array(name)
        if values is None:
            raise StoreError(f"{store.path}: metadata array {name} is missing")
        if values.shape != shape or values.dtype != dtype:
            raise StoreError(f"{store.path}: {name} has shape {values.shape} {values.dtype}, expected {shape} {np.dtype(dtype)}")
        if name != L.ORIGINAL_INDEX and not np.isfinite(values).all():
            raise StoreError(f"{store.path}: {name} has non-finite values")
        if f"{crc32c_array(values):08x}" != recorded.get(name):
            raise StoreError(f"{store.path}: checksum mismatch in {name}")
    if store.original_index.min() < 0:
        raise StoreError(f"{store.path}: original_index has negative entries")

    for level in store.levels:
        s = store if level == store.D else store.at_level(level)
        if s._images.dtype != store.dtype:
            raise StoreError(f"{store.path}: images at box {level} are {s._images.dtype}, expected {store.dtype}")
        crcs = s.checksums()
        if crcs is None or crcs.shape != (s.n_chunks,):
            raise StoreError(f"{store.path}: checksum array for box {level} is missing or has the wrong length")
        for c in tqdm(range(s.n_chunks), desc=f"verify {level}px", unit="chunk", disable=not progress):
            try:
                raw = s.raw_chunk(c)
            except Exception as exc:  # a damaged shard surfaces as a codec or index error
                raise StoreError(f"{store.path}: cannot read chunk {c} at box {level} ({type(exc).__name__}: {exc})") from None
            if crc32c_array(raw) != int(crcs[c]):
                start, stop = s.chunk_range(c)
                raise StoreError(f"{store.path}: checksum mismatch in chunk {c} (images {start}-{stop - 1}) at box {level}")
            if not np.isfinite(raw).all():
                raise StoreError(f"{store.path}: non-finite pixels in chunk {c} at box {level}")
            checked += 1
    return {"path": str(store.path), "ok": True, "n": n, "levels": store.levels, "chunks_checked": checked}
