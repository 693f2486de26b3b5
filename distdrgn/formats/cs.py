"""cryoSPARC ``.cs`` files: a structured numpy array saved with ``np.save``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from distdrgn.errors import FormatError


def read_cs(path: str | os.PathLike) -> np.ndarray:
    """The structured array of a cryoSPARC ``.cs`` file (one record per particle)."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise FormatError(f"{path}: not a cryoSPARC .cs file (numpy .npy structured array): {exc}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.names is None or arr.ndim != 1:
        raise FormatError(f"{path}: not a cryoSPARC .cs file (expected a 1-D structured array)")
    return arr


def write_cs(path: str | os.PathLike, arr: np.ndarray) -> None:
    """Write a 1-D structured array as a ``.cs`` file (exactly ``path``, no ``.npy`` suffix added)."""
    if arr.dtype.names is None or arr.ndim != 1:
        raise ValueError("write_cs needs a 1-D structured array")
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def require_fields(arr: np.ndarray, fields, path, purpose: str) -> None:
    """FormatError naming the first of ``fields`` missing from ``arr``."""
    for name in fields:
        if name not in arr.dtype.names:
            raise FormatError(f"{path}: no {name} field, needed for {purpose}")
