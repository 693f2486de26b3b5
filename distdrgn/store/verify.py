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
        "source_metadata": a.get("source_metadata"),
        "allow_nonfinite": bool(a.get("allow_nonfinite")),
        "nonfinite": store.nonfinite,
        "verification": store.verification,
    }


class ChunkError(StoreError):
    """A damaged or unexpected image chunk: where it is, for the verification record."""

    def __init__(self, message: str, level: int, chunk: int, images: tuple[int, int]):
        super().__init__(message)
        self.level, self.chunk, self.images = level, chunk, images


def verify(path, progress: bool = False, record: bool = True) -> dict:
    """Recompute every chunk checksum and check shapes, dtypes and finiteness.

    Returns a summary dict ({"path", "ok", "n", "levels", "chunks_checked", "nonfinite"
    (positions of images with NaN/inf pixels, in a store ingested with allow_nonfinite),
    "recorded"}); raises StoreError (one line, first problem found) otherwise. Reads the
    store one chunk at a time. With ``record`` the result (ok or the failure, with the first
    bad chunk and its image range) is written to the store's ``verification`` attribute,
    the only change verify makes to a store; training refuses a store whose last
    verification failed.
    """
    store = ParticleStore.open(path, verify_chunks=False)  # _check compares the checksums itself, chunk by chunk
    try:
        checked, nonfinite = _check(store, progress)
    except StoreError as exc:
        if record:
            where = {"level": exc.level, "chunk": exc.chunk, "images": list(exc.images)} if isinstance(exc, ChunkError) else {}
            _record(store, {"ok": False, "error": str(exc), **where})
        raise
    recorded = _record(store, {"ok": True, "nonfinite_images": len(nonfinite)}) if record else False
    return {"path": str(store.path), "ok": True, "n": store.n, "levels": store.levels, "chunks_checked": checked,
            "nonfinite": nonfinite, "recorded": recorded}


def _record(store: ParticleStore, result: dict) -> bool:
    """Write ``result`` (+ time, version) as the store's verification attribute; False if read-only."""
    import datetime as _dt

    import zarr

    from distdrgn import __version__

    entry = {**result, "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
             "distdrgn_version": __version__}
    try:
        zarr.open_group(store.path, mode="r+").attrs.update({L.VERIFICATION_ATTR: entry})
    except OSError:  # a read-only copy (e.g. a shared dataset): the check itself still stands
        return False
    return True


def _check(store: ParticleStore, progress: bool) -> tuple[int, list[int]]:
    """(chunks checked, sorted positions of non-finite images where the store allows them)."""
    from tqdm import tqdm

    a = store.attrs
    n = store.n
    checked = 0
    allow_nonfinite = bool(a.get("allow_nonfinite"))
    nonfinite: set[int] = set()
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
            start, stop = s.chunk_range(c)
            where = (level, c, (start, stop - 1))
            missing = s.missing_chunk_file(start // s.file_images)
            if missing:
                raise ChunkError(missing, *where)
            try:
                raw = s.raw_chunk(c)
            except Exception as exc:  # a damaged shard surfaces as a codec or index error
                detail = (str(exc).splitlines() or [""])[0]
                raise ChunkError(f"{store.path}: cannot read chunk {c} (images {start}-{stop - 1}) at box {level} "
                                 f"({type(exc).__name__}: {detail}); re-ingest the store", *where) from None
            if crc32c_array(raw) != int(crcs[c]):
                raise ChunkError(f"{store.path}: checksum mismatch in chunk {c} (images {start}-{stop - 1}) at box {level}: "
                                 "these particles (store positions) are damaged; re-ingest the store", *where)
            finite = np.isfinite(raw).all(axis=(1, 2))
            if not finite.all():
                if not allow_nonfinite:
                    bad = start + int(np.argmin(finite))
                    raise ChunkError(f"{store.path}: non-finite pixels in chunk {c} at box {level} (particle {bad})", *where)
                nonfinite.update((start + np.flatnonzero(~finite)).tolist())
            checked += 1
    return checked, sorted(nonfinite)
