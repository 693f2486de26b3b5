"""Headers of the files distdrgn reads, as printable text (``distdrgn view-header``).

- ``.mrc`` / ``.mrcs``: box, number of images (sections), voxel size, mode, origin, ...;
- ``.star``: each data block (table) with its row count and column names;
- ``.cs``: number of records, each field's name and dtype;
- a particle store directory: the JSON summary of ``distdrgn store info``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from distdrgn.errors import FormatError

_MODE_NAMES = {0: "int8", 1: "int16", 2: "float32", 3: "complex int16", 4: "complex64", 6: "uint16",
               12: "float16", 101: "4-bit"}


def mrc_header(path: str | os.PathLike) -> dict:
    """The main fields of an MRC header."""
    from distdrgn.formats.mrc import _read_header

    path = Path(path)
    h, has_map_id = _read_header(path)
    nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
    mx, my, mz = int(h.mx), int(h.my), int(h.mz)
    cella = (float(h.cella.x), float(h.cella.y), float(h.cella.z))
    voxel = tuple(c / m if m > 0 and c > 0 else None for c, m in zip(cella, (mx, my, mz)))
    mode = int(h.mode)
    return {
        "path": str(path),
        "box": [nx, ny],
        "n_images": nz,
        "shape (nx, ny, nz)": [nx, ny, nz],
        "mode": f"{mode} ({_MODE_NAMES.get(mode, 'unknown')})",
        "voxel size (A)": list(voxel),
        "cell (A)": list(cella),
        "sampling (mx, my, mz)": [mx, my, mz],
        "origin (A)": [float(h.origin.x), float(h.origin.y), float(h.origin.z)],
        "start (nxstart, nystart, nzstart)": [int(h.nxstart), int(h.nystart), int(h.nzstart)],
        "space group": int(h.ispg),
        "min / max / mean / rms": [float(h.dmin), float(h.dmax), float(h.dmean), float(h.rms)],
        "extended header bytes": int(h.nsymbt),
        "MAP id": has_map_id,
        "file bytes": path.stat().st_size,
    }


def star_header(path: str | os.PathLike) -> dict:
    """Each data block of a STAR file: row count (None for a key-value block) and column names."""
    import pandas as pd
    import starfile

    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=[])
    except Exception as exc:  # starfile raises assorted parser errors on malformed text
        raise FormatError(f"{path}: cannot parse as a STAR file ({type(exc).__name__}: {exc})") from None
    if not blocks:
        raise FormatError(f"{path}: no data blocks")
    tables = {}
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame):
            tables[f"data_{name}"] = {"rows": len(block), "columns": [str(c) for c in block.columns]}
        else:
            tables[f"data_{name}"] = {"rows": None, "columns": [str(k) for k in dict(block)]}
    return {"path": str(path), "tables": tables}


def cs_header(path: str | os.PathLike) -> dict:
    """Number of records and each field's name and dtype of a cryoSPARC .cs file."""
    from distdrgn.formats.cs import read_cs

    path = Path(path)
    arr = read_cs(path)
    fields = {}
    for name in arr.dtype.names:
        dt, _ = arr.dtype.fields[name][:2]
        fields[name] = str(dt.base) + (f" x {dt.shape}" if dt.shape else "")
    return {"path": str(path), "records": int(arr.shape[0]), "fields": fields}


def view_header(path: str | os.PathLike) -> tuple[str, dict]:
    """(kind, header dict) of ``path``, chosen from its extension or, for a directory, the store."""
    path = Path(path)
    if path.is_dir():
        from distdrgn.store.verify import info

        return "store", info(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix in (".mrc", ".mrcs", ".map"):
        return "mrc", mrc_header(path)
    if suffix == ".star":
        return "star", star_header(path)
    if suffix == ".cs":
        return "cs", cs_header(path)
    raise FormatError(f"{path}: unknown file type {suffix or '(no extension)'}; view-header reads .mrc, .mrcs, "
                      ".star, .cs and particle store directories")


def format_header(kind: str, header: dict) -> str:
    """Human-readable text for :func:`view_header`'s result (a store: its JSON, as ``store info``)."""
    if kind == "store":
        return json.dumps(header, indent=2)
    lines = [f"{header['path']}:"]
    if kind == "mrc":
        for key, value in header.items():
            if key != "path":
                if isinstance(value, list):
                    value = " ".join("unset" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))
                                     for v in value)
                lines.append(f"  {key}: {value}")
    elif kind == "star":
        for name, table in header["tables"].items():
            rows = "key-value block" if table["rows"] is None else f"{table['rows']} rows"
            lines.append(f"  {name}: {rows}, {len(table['columns'])} columns")
            lines.extend(f"    {c}" for c in table["columns"])
    elif kind == "cs":
        lines.append(f"  records: {header['records']}")
        lines.append(f"  fields ({len(header['fields'])}):")
        width = max(map(len, header["fields"]), default=0)
        lines.extend(f"    {name:<{width}}  {dt}" for name, dt in header["fields"].items())
    return "\n".join(lines)


def jsonable(header: dict) -> dict:
    """``header`` with numpy scalars made plain Python (for ``--json``)."""
    return json.loads(json.dumps(header, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))
