"""MRC image stacks and volumes.

Headers are parsed and written with :mod:`mrcfile`; image data is read lazily with
``seek`` + ``read`` of contiguous runs of images, so a stack of any size costs only the
images asked for, and a :class:`MrcStack` holds no open file (thousands of stacks can be
referenced at once, and the object pickles cleanly into data-loader workers).

Every stack is read as ``nz`` images of ``ny x nx``, whatever its space group says:
real particle stacks are written with ``ispg`` 0 (``.mrcs``) but also with ``ispg`` 1
(e.g. EMPIAR-10076's ``.mrc`` stack), so ``ispg`` cannot tell a stack from a volume.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mrcfile
import mrcfile.utils
import numpy as np

from distdrgn.errors import FormatError

# Modes with a numpy dtype; 3 (complex int16), 4 (complex64) and 101 (4-bit) are not images we can use.
SUPPORTED_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
_HEADER_BYTES = 1024


def _read_header(path: Path):
    """The header record of ``path`` in the file's byte order, or FormatError."""
    if not path.exists():
        raise FormatError(f"{path}: no such file")
    if not path.is_file():
        raise FormatError(f"{path}: not a regular file")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with mrcfile.open(path, mode="r", permissive=True, header_only=True) as mrc:
                header = mrc.header.copy()
    except ValueError as exc:
        raise FormatError(f"{path}: bad MRC header ({exc})") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    has_map_id = not any("Map ID" in str(w.message) for w in caught)
    return header, has_map_id


class MrcStack:
    """A lazily read stack of ``n`` square images of box ``D`` in one MRC file.

    Attributes: ``path``, ``n`` (images), ``D`` (box), ``dtype`` (numpy dtype on disk,
    with its byte order), ``apix`` (Angstrom/pixel from the header, None when unset),
    ``data_offset`` (byte offset of the first image).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        header, has_map_id = _read_header(self.path)
        nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
        mode = int(header.mode)
        if mode not in SUPPORTED_MODES:
            if not has_map_id:
                raise FormatError(f"{self.path}: bad MRC header (no MAP id and unknown mode {mode}); not an MRC file?")
            raise FormatError(
                f"{self.path}: unsupported MRC mode {mode} (supported: "
                + ", ".join(f"{m}={name}" for m, name in SUPPORTED_MODES.items())
                + ")"
            )
        if nx <= 0 or ny <= 0 or nz < 0 or int(header.nsymbt) < 0:
            raise FormatError(f"{self.path}: bad MRC header (nx={nx}, ny={ny}, nz={nz}, nsymbt={int(header.nsymbt)})")
        if ny != nx:
            raise FormatError(f"{self.path}: images are {ny} x {nx}; only square images are supported")
        if nx % 2:
            raise FormatError(f"{self.path}: box size {nx} is odd; only even box sizes are supported (crop or pad by one pixel)")
        self.n = nz
        self.D = nx
        self.dtype = mrcfile.utils.data_dtype_from_header(header)
        self.data_offset = _HEADER_BYTES + int(header.nsymbt)
        self.image_bytes = self.D * self.D * self.dtype.itemsize
        mx = int(header.mx)
        cella_x = float(header.cella.x)
        self.apix = cella_x / mx if mx > 0 and cella_x > 0 else None
        expected = self.data_offset + self.n * self.image_bytes
        size = self.path.stat().st_size
        if size < expected:
            raise FormatError(
                f"{self.path}: truncated MRC file: header says {self.n} images of {self.D}x{self.D} "
                f"({self.dtype.name}), needing {expected} bytes, but the file has {size}"
            )

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"MrcStack({str(self.path)!r}, n={self.n}, D={self.D}, dtype={self.dtype.name}, apix={self.apix})"

    def _positions(self, positions) -> np.ndarray:
        if isinstance(positions, slice):
            return np.arange(self.n)[positions]
        idx = np.asarray(positions)
        if idx.ndim == 0:
            idx = idx.reshape(1)
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"image positions must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            bad = idx[(idx < 0) | (idx >= self.n)][0]
            raise IndexError(f"{self.path}: image {bad} out of range for a stack of {self.n}")
        return idx

    def read(self, positions) -> np.ndarray:
        """Images at ``positions`` (int array/list or slice, 0-based), in that order.

        Returns (k, D, D) float32. Each run of consecutive positions is read with one
        seek + read; nothing else of the file is touched.
        """
        idx = self._positions(positions)
        out = np.empty((idx.size, self.D, self.D), dtype=np.float32)
        if idx.size == 0:
            return out
        wanted = np.unique(idx)  # sorted
        run_breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        images = np.empty((wanted.size, self.D, self.D), dtype=np.float32)
        with open(self.path, "rb") as f:
            start = 0
            for run in np.split(np.arange(wanted.size), run_breaks):
                first, count = int(wanted[run[0]]), run.size
                f.seek(self.data_offset + first * self.image_bytes)
                buf = f.read(count * self.image_bytes)
                if len(buf) != count * self.image_bytes:
                    raise FormatError(f"{self.path}: truncated MRC file (short read at image {first})")
                images[start : start + count] = np.frombuffer(buf, dtype=self.dtype).reshape(count, self.D, self.D)
                start += count
        out[:] = images[np.searchsorted(wanted, idx)]
        return out


def open_mrc(path: str | os.PathLike) -> MrcStack:
    """Open an MRC stack (.mrcs), single image or 3D .mrc as a lazy stack; FormatError if unusable."""
    return MrcStack(path)


def _check_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"MRC output dtype must be float32 or float16, got {dtype}")
    return dtype


def write_mrc(path: str | os.PathLike, data: np.ndarray, apix: float = 1.0, is_volume: bool = False) -> None:
    """Write a (N, D, D) image stack (ispg 0) or a (D, D, D) volume (ispg 1) as float32.

    The voxel size is set to ``apix`` and the origin to 0. A 2D (D, D) array is written
    as a one-image stack. Overwrites ``path``.
    """
    data = np.asarray(data, dtype=np.float32)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"expected a (N, D, D) stack or (D, D, D) volume, got shape {data.shape}")
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        if is_volume:
            mrc.set_volume()
        else:
            mrc.set_image_stack()
        mrc.voxel_size = float(apix)
        mrc.header.origin = (0.0, 0.0, 0.0)


class MrcStackWriter:
    """Streams ``n`` images of box ``D`` into a new MRC stack, a few at a time.

    Use as a context manager: the header (and a file of the final size) is created on
    entry, ``write(images)`` appends (k, D, D) arrays in order, and a normal exit checks
    that exactly ``n`` images were written and records min/max/mean/rms in the header.
    On an exception, or a wrong count, the partial file is deleted.
    """

    def __init__(self, path: str | os.PathLike, n: int, D: int, apix: float | None, dtype=np.float32):
        self.path = Path(path)
        self.n = int(n)
        self.D = int(D)
        self.apix = apix
        self.dtype = _check_dtype(dtype)
        if self.n < 1 or self.D < 1:
            raise ValueError(f"need n >= 1 and D >= 1, got n={n}, D={D}")
        self.count = 0
        self._mrc = None
        self._stats = [np.inf, -np.inf, 0.0, 0.0]  # min, max, sum, sum of squares (float64)

    def __enter__(self) -> "MrcStackWriter":
        mode = mrcfile.utils.mode_from_dtype(self.dtype)
        self._mrc = mrcfile.new_mmap(self.path, shape=(self.n, self.D, self.D), mrc_mode=mode, overwrite=True)
        self._mrc.set_image_stack()
        self._mrc.voxel_size = float(self.apix) if self.apix else 0.0
        self._mrc.header.origin = (0.0, 0.0, 0.0)
        return self

    def write(self, images: np.ndarray) -> None:
        """Append (k, D, D) (or one (D, D)) images after those already written."""
        if self._mrc is None:
            raise RuntimeError("MrcStackWriter.write called outside its 'with' block")
        images = np.asarray(images)
        if images.ndim == 2:
            images = images[None]
        if images.ndim != 3 or images.shape[1:] != (self.D, self.D):
            raise ValueError(f"{self.path}: expected (k, {self.D}, {self.D}) images, got {images.shape}")
        k = images.shape[0]
        if self.count + k > self.n:
            raise ValueError(f"{self.path}: writing {k} more images would exceed the declared {self.n}")
        block = images.astype(self.dtype, copy=False)
        self._mrc.data[self.count : self.count + k] = block
        wide = block.astype(np.float64)
        self._stats[0] = min(self._stats[0], float(wide.min()))
        self._stats[1] = max(self._stats[1], float(wide.max()))
        self._stats[2] += float(wide.sum())
        self._stats[3] += float(np.square(wide).sum())
        self.count += k

    def __exit__(self, exc_type, exc, tb) -> bool:
        mrc, self._mrc = self._mrc, None
        ok = exc_type is None and self.count == self.n
        if ok:
            npix = self.n * self.D * self.D
            mean = self._stats[2] / npix
            header = mrc.header
            header.dmin, header.dmax, header.dmean = self._stats[0], self._stats[1], mean
            header.rms = float(np.sqrt(max(self._stats[3] / npix - mean * mean, 0.0)))
        mrc.close()
        if not ok:
            self.path.unlink(missing_ok=True)
            if exc_type is None:
                raise FormatError(f"{self.path}: {self.count} images written but {self.n} declared; partial file removed")
        return False


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, float | None]:
    """A cubic volume: ((D, D, D) float32 indexed [z, y, x], Angstrom/voxel or None if unset)."""
    stack = open_mrc(path)
    if stack.n != stack.D:
        raise FormatError(f"{stack.path}: not a cubic volume ({stack.n} sections of {stack.D}x{stack.D})")
    return stack.read(slice(None)), stack.apix
