"""The source metadata of a store (storage/FORMAT.md, "Source metadata"), kept losslessly.

At ingest from a ``.star`` the particle table (every column, each value the text read by
:mod:`starfile` with all columns parsed as strings) and the optics table are stored columnar
under ``source/``; from a ``.cs`` every field of the record array (``uid`` included). Row i
of ``source/particles`` (or ``source/cs``) belongs to store position i: it is row
``original_index[i]`` of the source file. ``store export`` writes these rows back
(:func:`read_star_rows`, :func:`read_cs_rows`), so every column survives a round trip.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from distdrgn.errors import StoreError
from distdrgn.store import layout as L

ROW_CHUNK = 1 << 18


def _column(name: str, i: int) -> str:
    return f"{name}/c{i:04d}"


def _text_values(series) -> np.ndarray:
    """A column read as text -> object array of str (starfile turns 'nan' into NaN: back to 'nan')."""
    values = series.astype(object).to_numpy()
    missing = series.isna().to_numpy()
    if missing.any():
        values = values.copy()
        values[missing] = "nan"
    return np.asarray([str(v) for v in values], dtype=object)


def read_source(particles, kind: str | None) -> dict | None:
    """The source tables of ``particles`` (a .star or .cs path), or None for other kinds."""
    if kind == "star":
        from distdrgn.formats.star import _version_code, read_star

        star = read_star(particles, as_text=True)
        return {"kind": "star", "particles": star.particles, "optics": star.optics,
                "version": _version_code(Path(particles)), "block": star.block}
    if kind == "cs":
        from distdrgn.formats.cs import read_cs

        return {"kind": "cs", "records": read_cs(particles)}
    return None


def _create(group, name: str, values: np.ndarray, attrs: dict):
    rows = max(1, min(len(values), ROW_CHUNK))
    dtype = str if values.dtype == object else values.dtype
    arr = group.create_array(name, shape=values.shape, chunks=(rows, *values.shape[1:]), dtype=dtype,
                             compressors=None, fill_value="" if dtype is str else 0)
    arr[...] = values
    arr.attrs.update(attrs)


def write_source(group, tables: dict, original_index: np.ndarray) -> dict:
    """Write ``tables`` (from :func:`read_source`) under ``source/`` in store order; returns the
    summary recorded in the root attribute ``source_metadata``."""
    rows = np.asarray(original_index, dtype=np.int64)
    src = group.create_group(L.SOURCE_GROUP)
    summary = {"kind": tables["kind"], "group": L.SOURCE_GROUP, "rows": int(len(rows))}
    if tables["kind"] == "star":
        particles, optics = tables["particles"], tables["optics"]
        columns = [str(c) for c in particles.columns]
        for i, col in enumerate(columns):
            _create(src, _column("particles", i), _text_values(particles[col])[rows], {"column": col})
        optics_columns = None
        if optics is not None:
            optics_columns = [str(c) for c in optics.columns]
            for i, col in enumerate(optics_columns):
                _create(src, _column("optics", i), _text_values(optics[col]), {"column": col})
        src.attrs.update({"kind": "star", "columns": columns, "optics_columns": optics_columns,
                          "optics_rows": None if optics is None else int(len(optics)),
                          "version": tables["version"], "block": tables["block"]})
        summary.update({"columns": len(columns), "optics_rows": None if optics is None else int(len(optics)),
                        "star_version": tables["version"]})
    else:
        records = tables["records"][rows]
        fields = []
        for i, name in enumerate(records.dtype.names):
            ftype = records.dtype[name]
            values = records[name]
            if ftype.base.kind in "biufc":
                stored = "values"
            else:  # fixed-width bytes and anything else: the raw bytes of each record's field
                values = np.ascontiguousarray(values).view(np.uint8).reshape(len(records), ftype.itemsize)
                stored = "bytes"
            _create(src, _column("cs", i), np.ascontiguousarray(values), {"field": name, "stored_as": stored})
            fields.append(name)
        descr = np.lib.format.dtype_to_descr(records.dtype)
        src.attrs.update({"kind": "cs", "fields": fields, "descr": json.loads(json.dumps(descr))})
        summary.update({"fields": len(fields)})
    return summary


def _open(store_path):
    import zarr

    group = zarr.open_group(Path(store_path), mode="r")
    try:
        return group[L.SOURCE_GROUP]
    except KeyError:
        raise StoreError(f"{store_path}: the store has no source metadata (made before distdrgn kept it); "
                         "re-ingest the .star/.cs, or use --new-stack") from None


def read_star_rows(store_path, positions: np.ndarray):
    """(particles, optics, version, block) of the source star at store ``positions``: every
    column as text, in the original column order."""
    import pandas as pd

    src = _open(store_path)
    a = dict(src.attrs)
    particles = pd.DataFrame({col: np.asarray(src[_column("particles", i)][...], dtype=object)[positions]
                              for i, col in enumerate(a["columns"])})
    optics = None
    if a.get("optics_columns") is not None:
        optics = pd.DataFrame({col: np.asarray(src[_column("optics", i)][...], dtype=object)
                               for i, col in enumerate(a["optics_columns"])})
    return particles, optics, a.get("version"), a.get("block", "particles")


def _descr(value):
    """JSON'd numpy descr (lists) -> the list-of-tuples form numpy takes."""
    if isinstance(value, str):
        return value
    out = []
    for field in value:
        name, dt = field[0], _descr(field[1])
        out.append((name, dt) if len(field) == 2 else (name, dt, tuple(field[2])))
    return out


def read_cs_rows(store_path, positions: np.ndarray) -> np.ndarray:
    """The source .cs records at store ``positions`` (same dtype as the source file)."""
    src = _open(store_path)
    a = dict(src.attrs)
    dtype = np.lib.format.descr_to_dtype(_descr(a["descr"]))
    out = np.zeros(len(positions), dtype=dtype)
    for i, name in enumerate(a["fields"]):
        arr = src[_column("cs", i)]
        values = np.asarray(arr[...])[positions]
        if arr.attrs.get("stored_as") == "bytes":
            values = np.ascontiguousarray(values).view(dtype[name].base).reshape((len(positions), *dtype[name].shape))
        out[name] = values
    return out
