"""Utilities over cryoDRGN-style pickles: random index selections, concatenation and row filtering.

The pickles handled are the ones cryoDRGN and distdrgn write:

- index files (``ind.pkl``): one pickle of a 1-D integer array;
- ``ctf.pkl``: one pickle of an (N, 9) array (any array with one row per particle);
- ``poses.pkl``: one pickle of the tuple ``(rots (N, 3, 3), trans (N, 2))`` (or a bare rots array);
- ``z.pkl``: two consecutive pickles, ``z_mu`` then ``z_logvar``, each (N, zdim)
  (see :func:`distdrgn.checkpoint.load_z` / :func:`~distdrgn.checkpoint.save_z`).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distdrgn.errors import DistdrgnError, FormatError


def random_selection(n_select: int, n_total: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n_select`` distinct positions of ``range(n_total)`` drawn uniformly at random (seeded),
    and the remaining positions; both sorted int64."""
    if n_total <= 0:
        raise DistdrgnError(f"the number of particles must be positive, got {n_total}")
    if n_select <= 0:
        raise DistdrgnError(f"the number of particles to select must be positive, got {n_select}")
    if n_select > n_total:
        raise DistdrgnError(f"cannot select {n_select} particles at random out of {n_total}")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n_total, size=n_select, replace=False)).astype(np.int64)
    keep = np.ones(n_total, dtype=bool)
    keep[chosen] = False
    return chosen, np.flatnonzero(keep).astype(np.int64)


@dataclass
class PickleContents:
    """What a pickle file holds: ``kind`` ("z", "index", "tuple" or "array") and its ``parts``,
    the arrays whose first axis is the particle axis (z: [z_mu, z_logvar]; poses: [rots, trans])."""

    path: Path
    kind: str
    parts: list[np.ndarray]

    @property
    def n(self) -> int:
        return len(self.parts[0])

    def describe(self) -> str:
        shapes = ", ".join(f"{p.shape} {p.dtype}" for p in self.parts)
        return {"z": f"z file ({shapes})", "index": f"index array ({shapes})",
                "tuple": f"tuple of {len(self.parts)} arrays ({shapes})", "array": f"array ({shapes})"}[self.kind]


def read_pickle_contents(path: str | os.PathLike) -> PickleContents:
    """Read every consecutive pickle of ``path`` and classify the result; FormatError if it is not
    one array, one tuple of arrays, or two arrays (a z.pkl), each with a particle axis."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    objs = []
    try:
        with open(path, "rb") as f:
            while True:
                try:
                    objs.append(pickle.load(f))
                except EOFError:
                    break
    except Exception as exc:  # unpickling garbage raises many different types
        raise FormatError(f"{path}: not a pickle file ({type(exc).__name__}: {exc})") from None
    if not objs:
        raise FormatError(f"{path}: empty file")
    if len(objs) == 2:
        kind, raw = "z", objs
    elif len(objs) == 1 and isinstance(objs[0], (tuple, list)):
        kind, raw = "tuple", list(objs[0])
    elif len(objs) == 1:
        kind, raw = "array", [objs[0]]
    else:
        raise FormatError(f"{path}: holds {len(objs)} consecutive pickles (expected 1, or 2 for a z.pkl)")
    parts = []
    for obj in raw:
        if not isinstance(obj, np.ndarray):
            raise FormatError(f"{path}: holds a {type(obj).__name__}, not numpy arrays")
        if obj.ndim == 0:
            raise FormatError(f"{path}: holds a scalar array; expected one row per particle")
        parts.append(obj)
    if not parts:
        raise FormatError(f"{path}: holds an empty tuple")
    n = {len(p) for p in parts}
    if len(n) != 1:
        raise FormatError(f"{path}: its arrays have different numbers of rows ({', '.join(str(len(p)) for p in parts)})")
    if kind == "array" and parts[0].ndim == 1 and np.issubdtype(parts[0].dtype, np.integer):
        kind = "index"
    return PickleContents(path=path, kind=kind, parts=parts)


def write_pickle_contents(path: str | os.PathLike, contents: PickleContents) -> None:
    """Write ``contents`` in the layout it was read from; an OSError is a one-line DistdrgnError."""
    try:
        with open(path, "wb") as f:
            if contents.kind == "z":
                for part in contents.parts:
                    pickle.dump(part, f)
            elif contents.kind == "tuple":
                pickle.dump(tuple(contents.parts), f)
            else:
                pickle.dump(contents.parts[0], f)
    except OSError as exc:
        raise DistdrgnError(f"{path}: cannot write ({exc.strerror or exc})") from None


def _layout(c: PickleContents) -> tuple:
    return (c.kind, len(c.parts), tuple(p.shape[1:] for p in c.parts))


def concat_pkls(paths) -> PickleContents:
    """Row-wise concatenation of pickles of the same layout (index arrays, ctf arrays, poses
    tuples, z files keeping both z_mu and z_logvar), in the order given."""
    paths = list(paths)
    if len(paths) < 1:
        raise DistdrgnError("concat-pkls needs at least one input pickle")
    items = [read_pickle_contents(p) for p in paths]
    first = items[0]
    for item in items[1:]:
        if _layout(item) != _layout(first):
            raise FormatError(f"{item.path}: holds a {item.describe()}, which cannot be concatenated with "
                              f"{first.path}'s {first.describe()}")
    parts = [np.concatenate([item.parts[k] for item in items], axis=0) for k in range(len(first.parts))]
    return PickleContents(path=Path(""), kind=first.kind, parts=parts)


def filter_pkl(path: str | os.PathLike, ind) -> tuple[PickleContents, np.ndarray, int]:
    """The rows of the pickle at ``path`` (poses, ctf, z or index) at positions ``ind`` (a path to an
    ind.pkl or an integer array), in that order; returns (filtered contents, the positions, the input's number of rows)."""
    from distdrgn.formats.ind import load_indices

    contents = read_pickle_contents(path)
    idx = load_indices(ind, contents.n)
    return PickleContents(path=Path(""), kind=contents.kind, parts=[p[idx] for p in contents.parts]), idx, contents.n


def check_output(out: str | os.PathLike, force: bool) -> Path:
    """``out`` as a Path, after checking that it can be written (one-line DistdrgnError if not)."""
    out = Path(out)
    if out.is_dir():
        raise DistdrgnError(f"{out}: is a directory; -o takes the name of the pickle file to write")
    if out.exists() and not force:
        raise DistdrgnError(f"{out}: already exists; use --force to overwrite")
    if not out.parent.is_dir():
        raise DistdrgnError(f"{out}: output directory {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise DistdrgnError(f"{out}: output directory {out.parent} is not writable")
    return out
