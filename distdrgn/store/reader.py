"""Read-only access to a particle store, one level (box size) at a time.

Opening reads only metadata (``zarr.json`` files); images are read chunk by chunk on
demand, so any number of processes can open the same store concurrently and none of them
holds the whole dataset in memory. Poses, CTF and original indices are small and loaded
lazily on first access.

With ``verify_chunks`` (the default) every image chunk is checked against the crc32c recorded
at ingest each time it is read, and each metadata array (poses, CTF, original indices)
against its recorded crc32c when it is first loaded: a damaged store fails at the read, naming
the chunk and its particles, instead of training on wrong values. The metadata is checked on
first access rather than in ``open`` because data-loader workers open the store only to read
image chunks and would otherwise each re-read every pose and CTF row. crc32c runs at several
GB/s, a small cost next to the read itself (``benchmarks/loader_throughput.py --no-verify``
measures it). ``verify_chunks=False`` (training's ``data.allow_unverified=true``) reads the
values as they are.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr

from distdrgn.errors import StoreError
from distdrgn.store import layout as L
from distdrgn.store.checksums import crc32c_array


def read_store_attrs(path: Path) -> dict:
    """Group attributes of the store at ``path``; StoreError (one line) if it is not a complete store."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such particle store")
    meta_file = path / "zarr.json"
    if not path.is_dir() or not meta_file.is_file():
        raise StoreError(f"{path}: not a particle store (no zarr.json)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable zarr.json ({exc})") from None
    attrs = meta.get("attributes") or {}
    if meta.get("node_type") != "group" or attrs.get("format") != L.FORMAT_NAME:
        raise StoreError(f"{path}: not a {L.FORMAT_NAME} store (format attribute is {attrs.get('format')!r})")
    version = attrs.get("version")
    if isinstance(version, int) and version > max(L.SUPPORTED_VERSIONS):
        raise StoreError(f"{path}: store format version {version} is newer than this distdrgn reads "
                         f"(up to {max(L.SUPPORTED_VERSIONS)}); upgrade distdrgn")
    if version not in L.SUPPORTED_VERSIONS:
        raise StoreError(f"{path}: store format version {version} is not supported (this distdrgn reads {L.SUPPORTED_VERSIONS})")
    if path.name.endswith(L.PARTIAL_SUFFIX) or attrs.get("complete") is not True:
        raise StoreError(f"{path}: incomplete store (an ingest did not finish); re-run the ingest to resume it")
    return attrs


class ParticleStore:
    """A complete particle store opened at one level (box size ``D``)."""

    def __init__(self, path: Path, attrs: dict, level: int, verify_chunks: bool = True):
        self.path = Path(path)
        self.verify_chunks = bool(verify_chunks)
        self.attrs = attrs
        self.levels: list[int] = [int(d) for d in attrs["levels"]]
        self.full_D = int(attrs["D"])
        self.D = int(level)
        self.n = int(attrs["n"])
        self.dtype = np.dtype(attrs["dtype"])
        full_apix = attrs.get("apix")
        self.apix = None if full_apix is None else float(full_apix) * self.full_D / self.D
        self._group = zarr.open_group(self.path, mode="r")
        self._images = self._group[L.images_name(self.D, self.full_D)]
        if self._images.shape != (self.n, self.D, self.D):
            raise StoreError(f"{self.path}: images at box {self.D} have shape {self._images.shape}, expected {(self.n, self.D, self.D)}")
        self.chunk_images = int(self._images.chunks[0])
        self.n_chunks = -(-self.n // self.chunk_images)
        # a missing chunk (shard) file reads back as the fill value: check each file once
        self.file_images = int((self._images.shards or self._images.chunks)[0])
        self._file_present = np.zeros(-(-self.n // self.file_images), dtype=bool)

    @classmethod
    def open(cls, path, level: int | None = None, verify_chunks: bool = True) -> "ParticleStore":
        """Open a complete store; ``level`` is a box size from ``levels`` (default: the full size).

        ``verify_chunks``: check each image chunk read and each metadata array loaded against
        the checksums recorded at ingest (StoreError on a mismatch); False reads them unchecked.
        """
        path = Path(path)
        attrs = read_store_attrs(path)
        levels = [int(d) for d in attrs["levels"]]
        level = int(attrs["D"]) if level is None else int(level)
        if level not in levels:
            raise StoreError(f"{path}: no images at box size {level}; stored levels are {levels}")
        try:
            return cls(path, attrs, level, verify_chunks)
        except (KeyError, FileNotFoundError, ValueError) as exc:
            raise StoreError(f"{path}: damaged store ({type(exc).__name__}: {exc})") from None

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"ParticleStore({str(self.path)!r}, n={self.n}, D={self.D}, dtype={self.dtype.name}, levels={self.levels})"

    def at_level(self, level: int) -> "ParticleStore":
        """The same store opened at another box size."""
        return ParticleStore.open(self.path, level, verify_chunks=self.verify_chunks)

    # ---- images -------------------------------------------------------------------------
    def chunk_range(self, chunk_id: int) -> tuple[int, int]:
        """[start, stop) image positions of chunk ``chunk_id``."""
        if not 0 <= chunk_id < self.n_chunks:
            raise IndexError(f"chunk {chunk_id} out of range [0, {self.n_chunks})")
        start = chunk_id * self.chunk_images
        return start, min(self.n, start + self.chunk_images)

    def chunk_file(self, file_id: int) -> Path:
        """Path of chunk file ``file_id`` (a shard of ``file_images`` images) of this level."""
        key = self._images.metadata.encode_chunk_key((int(file_id), 0, 0))
        return self.path / L.images_name(self.D, self.full_D) / key

    def missing_chunk_file(self, file_id: int) -> str | None:
        """One-line description if chunk file ``file_id`` is missing (and its images were not all
        the fill value, which zarr leaves unwritten); else None. Checked once per file."""
        if self._file_present[file_id]:
            return None
        if not self.chunk_file(file_id).is_file():
            start = file_id * self.file_images
            stop = min(self.n, start + self.file_images)
            c0, c1 = start // self.chunk_images, -(-stop // self.chunk_images)
            crcs = self.checksums()
            if crcs is None or any(int(crcs[c]) != self._fill_crc(*self.chunk_range(c)) for c in range(c0, c1)):
                name = self.chunk_file(file_id).relative_to(self.path)
                chunks = f"chunk {c0}" if c1 - c0 == 1 else f"chunks {c0}-{c1 - 1}"
                return (f"{self.path}: chunk file {name} is missing ({chunks}, particles {start}-{stop - 1}, "
                        f"at box {self.D}); the store is damaged, re-ingest it")
        self._file_present[file_id] = True
        return None

    def _fill_crc(self, start: int, stop: int) -> int:
        return crc32c_array(np.zeros((stop - start, self.D, self.D), dtype=self._images.dtype))

    def _check_files(self, file_ids: np.ndarray) -> None:
        """StoreError if one of the chunk files ``file_ids`` is missing."""
        for f in file_ids[~self._file_present[file_ids]]:
            problem = self.missing_chunk_file(int(f))
            if problem:
                raise StoreError(problem)

    def _check_range(self, start: int, stop: int) -> None:
        self._check_files(np.arange(start // self.file_images, (stop - 1) // self.file_images + 1))

    def read_chunk(self, chunk_id: int) -> np.ndarray:
        """float32 (stop - start, D, D) images of one chunk, in one read (checksum-checked
        with ``verify_chunks``)."""
        return np.asarray(self.raw_chunk(chunk_id), dtype=np.float32)

    def raw_chunk(self, chunk_id: int) -> np.ndarray:
        """A chunk's values in the stored dtype (what the checksums cover); with
        ``verify_chunks`` StoreError if they do not match the checksum recorded at ingest."""
        start, stop = self.chunk_range(chunk_id)
        self._check_range(start, stop)
        raw = np.asarray(self._images[start:stop])
        if self.verify_chunks:
            self._check_chunk(chunk_id, raw)
        return raw

    @cached_property
    def _chunk_crcs(self) -> np.ndarray | None:
        return self.checksums()

    def _check_chunk(self, chunk_id: int, raw: np.ndarray) -> None:
        """StoreError if chunk ``chunk_id``'s values ``raw`` (stored dtype) do not match its recorded crc32c."""
        crcs = self._chunk_crcs
        if crcs is None or crcs.shape != (self.n_chunks,):
            raise StoreError(f"{self.path}: the chunk checksums at box {self.D} are missing or have the wrong length; "
                             "the store is damaged, re-ingest it (or read it unchecked: data.allow_unverified=true)")
        if crc32c_array(raw) != int(crcs[chunk_id]):
            start, stop = self.chunk_range(chunk_id)
            raise StoreError(f"{self.path}: checksum mismatch in chunk {chunk_id} (particles {start}-{stop - 1}) at box "
                             f"{self.D}: these particles (store positions) are damaged; re-ingest the store, or set "
                             "data.allow_unverified=true to train on it anyway")

    def images(self, indices) -> np.ndarray:
        """float32 (k, D, D) images at store positions ``indices``, in that order.

        Each chunk holding a requested image is read once (only the span between its first
        and last requested image, or with ``verify_chunks`` the whole chunk, which its checksum
        covers: zarr decodes whole chunks anyway); no other chunk is touched. StoreError if a
        chunk file holding one of them is missing or a chunk does not match its checksum.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((idx.size, self.D, self.D), dtype=np.float32)
        if idx.size == 0:
            return out
        if idx.min() < 0 or idx.max() >= self.n:
            raise IndexError(f"image positions must be in [0, {self.n})")
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        chunk_of = sorted_idx // self.chunk_images
        self._check_files(np.unique(sorted_idx // self.file_images))
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        for group in np.split(np.arange(idx.size), bounds):
            if self.verify_chunks:
                c = int(chunk_of[group[0]])
                lo = self.chunk_range(c)[0]
                raw = np.asarray(self._images[slice(*self.chunk_range(c))])
                self._check_chunk(c, raw)
                block = raw.astype(np.float32, copy=False)
            else:
                lo, hi = int(sorted_idx[group[0]]), int(sorted_idx[group[-1]]) + 1
                block = np.asarray(self._images[lo:hi], dtype=np.float32)
            out[order[group]] = block[sorted_idx[group] - lo]
        return out

    # ---- metadata -----------------------------------------------------------------------
    def _array(self, name: str) -> np.ndarray | None:
        try:
            arr = self._group[name]
        except KeyError:
            return None
        return np.asarray(arr[...])

    def _metadata(self, name: str) -> np.ndarray | None:
        """A metadata array (poses, CTF, original indices), checked against the crc32c recorded at
        ingest (``metadata_crc32c``) with ``verify_chunks``."""
        values = self._array(name)
        recorded = (self.attrs.get("metadata_crc32c") or {}).get(name)
        if self.verify_chunks and values is not None and recorded is not None and f"{crc32c_array(values):08x}" != recorded:
            raise StoreError(f"{self.path}: checksum mismatch in {name}: the store's metadata is damaged; re-ingest "
                             "the store, or set data.allow_unverified=true to train on it anyway")
        return values

    @cached_property
    def poses(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(rots (n, 3, 3) float32, trans (n, 2) float32 as a fraction of the box) or None."""
        if not self.attrs.get("has_poses"):
            return None
        return self._metadata(L.ROTS), self._metadata(L.TRANS)

    @cached_property
    def ctf(self) -> np.ndarray | None:
        """(n, 9) float32 in ctf.pkl layout, with the box and pixel size of the source images."""
        if not self.attrs.get("has_ctf"):
            return None
        return self._metadata(L.CTF)

    @cached_property
    def original_index(self) -> np.ndarray:
        """(n,) int64: the position of each stored image in the source particle list."""
        return self._metadata(L.ORIGINAL_INDEX)

    def norm(self, level: int | None = None) -> dict:
        """{"mean", "std", "ht_std", "ht_std_nowindow", "n_sampled"} at ``level`` (default: this one)."""
        level = self.D if level is None else int(level)
        try:
            return dict(self.attrs["norm"][str(level)])
        except KeyError:
            raise StoreError(f"{self.path}: no normalisation statistics at box size {level}; stored levels are {self.levels}") from None

    @property
    def verification(self) -> dict | None:
        """The record of the last ``store verify`` (None if never verified): {"ok", "time",
        "distdrgn_version", and when it failed "error", "level", "chunk", "images" [first, last]}."""
        return self.attrs.get(L.VERIFICATION_ATTR)

    @property
    def nonfinite(self) -> dict | None:
        """{"count", "positions"} of images with NaN/inf pixels (stores ingested with allow_nonfinite)."""
        return self.attrs.get(L.NONFINITE_ATTR)

    def checksums(self, level: int | None = None) -> np.ndarray:
        """(n_chunks,) uint32 crc32c of each chunk at ``level`` as recorded at ingest."""
        level = self.D if level is None else int(level)
        return self._array(L.checksum_name(level, self.full_D))
