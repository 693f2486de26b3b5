"""Pickled metadata files (cryoDRGN style) and particle index files (``ind.pkl``).

``ind.pkl`` is a pickle of a 1-D integer array of particle positions, as written by
``cryodrgn filter`` / ``distdrgn select`` and read by ``--ind`` options.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from distdrgn.errors import FormatError


def read_pickle(path: str | os.PathLike, what: str = "pickle") -> object:
    """Unpickle ``path``; a missing or unreadable file is a one-line FormatError naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file (expected a {what} pickle)")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception as exc:  # unpickling garbage raises many different types
        raise FormatError(f"{path}: not a pickle file of {what} ({type(exc).__name__}: {exc})") from None


def read_text_array(path: str | os.PathLike, what: str, dtype, ndmin: int) -> np.ndarray:
    """``np.loadtxt`` of a whitespace-separated text file; a missing or unparsable file is a
    one-line FormatError naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such {what} file")
    try:
        return np.loadtxt(path, dtype=dtype, ndmin=ndmin)
    except ValueError as exc:
        raise FormatError(f"{path}: cannot parse {what} ({str(exc).splitlines()[0]})") from None


def check_indices(arr, n: int, label: str) -> np.ndarray:
    """Validate a 1-D, non-empty integer array of positions in [0, n) -> int64 copy."""
    arr = np.asarray(arr)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise FormatError(f"{label}: expected a non-empty 1-D array of integer indices, got shape {arr.shape} {arr.dtype}")
    if arr.min() < 0 or arr.max() >= n:
        raise FormatError(f"{label}: indices must be in [0, {n}) for {n} particles, got range [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64)


def load_indices(ind, n: int) -> np.ndarray:
    """``ind`` (a path to ind.pkl, or an integer array) -> validated int64 positions in [0, n)."""
    if isinstance(ind, (str, os.PathLike)):
        return check_indices(read_pickle(ind, "index"), n, str(ind))
    return check_indices(ind, n, "--ind")


def save_indices(path: str | os.PathLike, ind) -> None:
    """Write ``ind.pkl``: a pickle of the int64 array."""
    with open(path, "wb") as f:
        pickle.dump(np.asarray(ind, dtype=np.int64), f)
