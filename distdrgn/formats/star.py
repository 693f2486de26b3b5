"""RELION ``.star`` files (3.0, 3.1/4 and 5 layouts), read and written with :mod:`starfile`.

Column names are kept as :mod:`starfile` gives them, without the leading underscore
(``rlnImageName``, ``rlnDefocusU``...). RELION 3.0 files have one particle table; 3.1 and
later have a ``data_optics`` table whose rows are referenced by each particle's
``rlnOpticsGroup`` and a ``data_particles`` table.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import starfile  # reading only; see _loop_block

from distdrgn.errors import FormatError

# Text columns that must not be coerced to numbers (a micrograph named "0001" stays "0001").
STRING_COLUMNS = ["rlnImageName", "rlnMicrographName", "rlnOpticsGroupName", "rlnImageOriginalName"]
_VERSION_RE = re.compile(r"^#\s*version\s+(\d+)")
_HEAD_LINES_SCANNED = 200


@dataclass
class StarData:
    """Tables of a particle star file: ``particles`` (one row each), ``optics`` (None for
    RELION 3.0) and ``version`` ("3.0", "3.1" or "5.0")."""

    particles: pd.DataFrame
    optics: pd.DataFrame | None
    version: str
    block: str = "particles"  # name of the particle table's data block ("" for a bare data_)


def _version_code(path: Path) -> int | None:
    """The number of the first ``# version NNNNN`` comment near the top of the file."""
    with open(path, "r", errors="replace") as f:
        for _, line in zip(range(_HEAD_LINES_SCANNED), f):
            m = _VERSION_RE.match(line.strip())
            if m:
                return int(m.group(1))
    return None


def _all_column_names(path: Path) -> list[str]:
    """Every ``_label`` named in the file (loop headers and key-value pairs)."""
    names = set()
    with open(path, "r", errors="replace") as f:
        for line in f:
            if line.startswith("_"):
                names.add(line.split()[0][1:])
    return sorted(names)


def read_star(path: str | os.PathLike, as_text: bool = False) -> StarData:
    """Read the particle (and optics) tables of a RELION star file.

    ``as_text``: every column as the text in the file (no numeric parsing; what
    ``distdrgn ingest`` keeps so that ``store export`` writes the values back unchanged).
    """
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    try:
        as_string = _all_column_names(path) if as_text else STRING_COLUMNS
        blocks = starfile.read(path, always_dict=True, parse_as_string=as_string)
    except Exception as exc:  # starfile raises assorted parser errors on malformed text
        raise FormatError(f"{path}: cannot parse as a STAR file ({type(exc).__name__}: {exc})") from None
    tables = {name: block for name, block in blocks.items() if isinstance(block, pd.DataFrame)}
    optics = tables.get("optics")
    block = "particles"
    if "particles" in tables:
        particles = tables["particles"]
    else:
        candidates = [(name, t) for name, t in tables.items() if name != "optics" and "rlnImageName" in t.columns]
        if not candidates:
            candidates = [(name, t) for name, t in tables.items() if name != "optics"]
        if len(candidates) != 1:
            raise FormatError(
                f"{path}: found no single particle table (loop blocks: {', '.join(map(repr, tables)) or 'none'})"
            )
        block, particles = candidates[0]
    if len(particles) == 0:
        raise FormatError(f"{path}: the particle table is empty")
    if optics is None:
        version = "3.0"
    else:
        code = _version_code(path)
        version = "5.0" if code is not None and code >= 50000 else "3.1"
    return StarData(particles=particles.reset_index(drop=True), optics=optics, version=version, block=str(block))


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def numeric_columns(table: pd.DataFrame, columns, path: str | os.PathLike = "star file") -> np.ndarray:
    """Columns of a (merged) star table as float64: (N,) for one name, (N, k) for a list.

    A value that is not a number (``rlnDefocusU`` = ``abc``) raises FormatError naming the
    file, the column, the first bad row (0-based, in the particle table) and its value.
    """
    names = [columns] if isinstance(columns, str) else list(columns)
    out = np.empty((len(table), len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        col = table[name]
        try:
            out[:, j] = col.to_numpy(np.float64)
            continue
        except (TypeError, ValueError):
            pass
        row, value = next(((i, v) for i, v in enumerate(col.tolist()) if not _is_number(v)), (0, col.iloc[0]))
        raise FormatError(f"{path}: column _{name} must be numeric, but row {row} is {value!r}")
    return out[:, 0] if isinstance(columns, str) else out


def particles_with_optics(star: StarData, path: str | os.PathLike = "star file") -> pd.DataFrame:
    """Particle table with each particle's optics-group columns added to its row.

    Columns present in both tables keep the particle's value. ``path`` only names the
    file in error messages.
    """
    particles = star.particles.copy()
    if star.optics is None:
        return particles
    optics = star.optics
    if "rlnOpticsGroup" in particles.columns and "rlnOpticsGroup" in optics.columns:
        group_ids = pd.Index(optics["rlnOpticsGroup"])
        if not group_ids.is_unique:
            raise FormatError(f"{path}: duplicate rlnOpticsGroup numbers in data_optics")
        rows = group_ids.get_indexer(particles["rlnOpticsGroup"])
        if (rows < 0).any():
            missing = particles["rlnOpticsGroup"].to_numpy()[rows < 0][0]
            raise FormatError(f"{path}: particles reference optics group {missing}, which data_optics lacks")
    elif len(optics) == 1:
        rows = [0] * len(particles)
    else:
        raise FormatError(f"{path}: {len(optics)} optics groups but the particles have no rlnOpticsGroup column")
    for col in optics.columns:
        if col not in particles.columns:
            particles[col] = optics[col].to_numpy()[rows]
    return particles


def _strip_underscores(df: pd.DataFrame) -> pd.DataFrame:
    return df.rename(columns=lambda c: str(c).lstrip("_"))


def _loop_block(name: str, df: pd.DataFrame, version_comment: bool, version: int = 30001) -> str:
    """One ``data_<name>`` loop table. Formatted by pandas' C writer: starfile's writer
    formats row by row and takes minutes for the millions of rows of a real dataset."""
    df = _strip_underscores(df)
    head = [f"# version {version}", ""] if version_comment else []
    head += [f"data_{name}", "", "loop_"] + [f"_{col} #{i + 1}" for i, col in enumerate(df.columns)]
    body = df.to_csv(sep=" ", header=False, index=False, float_format="%.12g", na_rep="nan", quoting=csv.QUOTE_MINIMAL,
                     quotechar='"', lineterminator="\n")
    return "\n".join(head) + "\n" + body + "\n"


def write_star(path: str | os.PathLike, particles: pd.DataFrame, optics: pd.DataFrame | None = None, *,
               version: int | None = None, particles_block: str = "particles") -> None:
    """Write a particle star file: RELION 3.1 layout (data_optics + data_particles, each
    marked ``# version 30001``) when ``optics`` is given, else a single data_particles table
    (RELION 3.0 layout). Column names may be given with or without the leading underscore.
    Floats are written with 12 significant digits: RELION's 6 decimals for ordinary values and float32 precision for small ones.
    ``version``: the ``# version`` number (default 30001); ``particles_block``: the particle
    table's block name (``data_particles`` by default).
    """
    version = 30001 if version is None else int(version)
    text = "# written by distdrgn\n\n"
    if optics is not None:
        text += _loop_block("optics", optics, version_comment=True, version=version) + "\n"
    text += _loop_block(particles_block, particles, version_comment=optics is not None, version=version)
    Path(path).write_text(text)
