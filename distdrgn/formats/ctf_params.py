"""CTF parameters from RELION .star / cryoSPARC .cs files, and cryoDRGN's ``ctf.pkl``.

Rows follow :data:`distdrgn.ctf.CTF_COLUMNS`:
``[D, apix, dfu, dfv, dfang, kv, cs, w, phase_shift]`` (px, A/px, A, A, deg, kV, mm, -, deg).
Every value comes from the file unless given as an option, which overrides the file
(for all particles).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from distdrgn.errors import FormatError
from distdrgn.formats.cs import read_cs, require_fields
from distdrgn.formats.ind import read_pickle
from distdrgn.formats.poses import box_size_column, pixel_size_column
from distdrgn.formats.star import numeric_columns, particles_with_optics, read_star

N_CTF_COLUMNS = 9


def _column(table, name: str, override, path, purpose: str, default=None) -> np.ndarray:
    if override is not None:
        return np.full(len(table), float(override))
    if name in table.columns:
        return numeric_columns(table, name, path)
    if default is not None:
        return np.full(len(table), float(default))
    raise FormatError(f"{path}: no _{name} column, needed for {purpose}; pass it as an option")


def ctf_from_star_table(table, path, D=None, apix=None, kv=None, cs=None, w=None, ps=None) -> np.ndarray:
    """(N, 9) float64 from a star particle table merged with its optics (``particles_with_optics``)."""
    n = len(table)
    box = np.full(n, float(D)) if D is not None else box_size_column(table, path, "the CTF")
    px = np.full(n, float(apix)) if apix is not None else pixel_size_column(table, path, "the CTF")
    return np.stack(
        [
            box,
            px,
            _column(table, "rlnDefocusU", None, path, "the CTF"),
            _column(table, "rlnDefocusV", None, path, "the CTF"),
            _column(table, "rlnDefocusAngle", None, path, "the CTF"),
            _column(table, "rlnVoltage", kv, path, "the CTF (--kv)"),
            _column(table, "rlnSphericalAberration", cs, path, "the CTF (--cs)"),
            _column(table, "rlnAmplitudeContrast", w, path, "the CTF (-w)"),
            # RELION omits the column when no phase plate was used.
            _column(table, "rlnPhaseShift", ps, path, "the CTF (--ps)", default=0.0),
        ],
        axis=1,
    )


def _cs_field(arr, name, override, path, convert=None) -> np.ndarray:
    if override is not None:
        return np.full(len(arr), float(override))
    require_fields(arr, [name], path, "the CTF")
    values = arr[name].astype(np.float64)
    return convert(values) if convert else values


def ctf_from_cs_array(arr: np.ndarray, path, D=None, apix=None, kv=None, cs=None, w=None, ps=None) -> np.ndarray:
    """(N, 9) float64 from a cryoSPARC structured array (``path`` names it in errors)."""
    require_fields(arr, ["ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad"], path, "the CTF")
    n = len(arr)
    if D is not None:
        box = np.full(n, float(D))
    else:
        require_fields(arr, ["blob/shape"], path, "the box size (or pass -D)")
        box = arr["blob/shape"][:, 0].astype(np.float64)
    return np.stack(
        [
            box,
            _cs_field(arr, "blob/psize_A", apix, path),
            arr["ctf/df1_A"].astype(np.float64),
            arr["ctf/df2_A"].astype(np.float64),
            np.rad2deg(arr["ctf/df_angle_rad"].astype(np.float64)),
            _cs_field(arr, "ctf/accel_kv", kv, path),
            _cs_field(arr, "ctf/cs_mm", cs, path),
            _cs_field(arr, "ctf/amp_contrast", w, path),
            _cs_field(arr, "ctf/phase_shift_rad", ps, path, convert=np.rad2deg)
            if ps is not None or "ctf/phase_shift_rad" in arr.dtype.names
            else np.zeros(n),
        ],
        axis=1,
    )


def parse_ctf(
    path: str | os.PathLike,
    D: int | None = None,
    apix: float | None = None,
    kv: float | None = None,
    cs: float | None = None,
    w: float | None = None,
    ps: float | None = None,
) -> np.ndarray:
    """CTF parameters (N, 9) float32 of a .star or .cs file in the ctf.pkl layout.

    D, apix, kv (kV), cs (mm), w (amplitude contrast), ps (phase shift, degrees) override
    the file's values; a value that is neither in the file nor given raises FormatError
    naming the missing field.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".star":
        params = ctf_from_star_table(particles_with_optics(read_star(path), path), path, D, apix, kv, cs, w, ps)
    elif suffix == ".cs":
        params = ctf_from_cs_array(read_cs(path), path, D, apix, kv, cs, w, ps)
    else:
        raise FormatError(f"{path}: unknown CTF file type {suffix or '(no extension)'!r}; expected .star or .cs")
    return check_ctf(params, path)


def check_ctf(params, source) -> np.ndarray:
    """Validate an (N, 9) ctf.pkl array and return it as float32; FormatError naming ``source``."""
    params = np.asarray(params)
    if params.ndim != 2 or params.shape[1] != N_CTF_COLUMNS:
        raise FormatError(f"{source}: CTF parameters have shape {params.shape}, expected (N, {N_CTF_COLUMNS})")
    if not np.issubdtype(params.dtype, np.number):
        raise FormatError(f"{source}: CTF parameters are {params.dtype}, not numbers")
    params = params.astype(np.float32)
    if not np.isfinite(params).all():
        row = int(np.flatnonzero(~np.isfinite(params).all(axis=1))[0])
        raise FormatError(f"{source}: non-finite CTF parameters in row {row}")
    if len(params) and (params[:, 0].min() <= 0 or params[:, 1].min() <= 0):
        raise FormatError(f"{source}: box size and pixel size must be positive")
    return params


# Only the physical box (box x pixel size, in A) of the CTF rows must match the images: images
# Fourier-cropped after the CTF was estimated keep the extent (training uses the CTF's
# D * apix / stored box as pixel size). Pixel sizes in headers are often rounded, hence a
# small tolerance for a warning and a large one before refusing.
EXTENT_WARN = 0.02
EXTENT_ERROR = 0.2


def _span(values: np.ndarray, fmt: str) -> str:
    lo, hi = float(values.min()), float(values.max())
    return format(lo, fmt) if lo == hi else f"{lo:{fmt}} to {hi:{fmt}}"


def check_ctf_matches_images(params: np.ndarray, D: int, apix: float | None, source, images) -> str | None:
    """Compare the CTF rows' box and pixel size (columns 0, 1 of (N, 9) ``params``) with the
    images' (box ``D`` px, ``apix`` A/px or None when unknown).

    FormatError when both the box and the physical extent (box x pixel size) disagree by
    more than :data:`EXTENT_ERROR` (a CTF table from another dataset); otherwise a warning
    (returned, one line) when the extents differ by more than :data:`EXTENT_WARN`, or the
    boxes differ and the images' pixel size is unknown; else None.
    """
    params = np.asarray(params)
    if params.size == 0:
        return None
    box, px = params[:, 0].astype(np.float64), params[:, 1].astype(np.float64)
    ctf_desc = f"the CTF rows are for box {_span(box, '.0f')} px at {_span(px, '.4g')} A/px"
    if apix is None or not apix > 0:
        if np.any(box != D):
            return (f"{source}: {ctf_desc} but the images {images} are {D} px with an unknown pixel size; make sure "
                    "the CTF parameters belong to these images")
        return None
    extent, image_extent = box * px, D * float(apix)
    rel = np.abs(extent / image_extent - 1)
    desc = (f"{ctf_desc} ({_span(extent, '.4g')} A across) but the images {images} are {D} px at {apix:.4g} A/px "
            f"({image_extent:.4g} A)")
    if rel.max() > EXTENT_ERROR and np.any(box != D):
        raise FormatError(f"{source}: {desc}: these CTF parameters are not for these images (another dataset?); "
                          "give the matching ctf.pkl")
    if rel.max() > EXTENT_WARN:
        return (f"{source}: {desc}; check that the CTF parameters belong to these images (training uses the CTF "
                "rows' pixel size)")
    return None


def save_ctf(path: str | os.PathLike, params: np.ndarray) -> None:
    """Write cryoDRGN's ``ctf.pkl``: a pickle of the (N, 9) float32 array."""
    params = check_ctf(params, path)
    with open(path, "wb") as f:
        pickle.dump(params, f)


def load_ctf(path: str | os.PathLike) -> np.ndarray:
    """Read a cryoDRGN ``ctf.pkl`` -> (N, 9) float32, validated."""
    obj = read_pickle(path, "CTF")
    if not isinstance(obj, np.ndarray):
        raise FormatError(f"{path}: expected a pickled (N, 9) array, got {type(obj).__name__}")
    return check_ctf(obj, path)
