"""Particle poses: RELION Euler angles, cryoSPARC axis-angle vectors, cryoDRGN ``poses.pkl``.

``rots[i]`` (3 x 3) maps lattice row vectors to volume coordinates: the slice of image i
samples the volume at ``[x, y, 0] @ rots[i]`` (docs/conventions.md). ``trans[i]`` (x, y) is the
particle's offset as a fraction of the box.

RELION stores ZYZ Euler angles (rot, tilt, psi) of the matrix
``A = Rz(psi) Ry(tilt) Rz(rot)`` written with RELION's sign convention (a rotation of the
axes, so each factor is the transpose of the usual active rotation); cryoDRGN's ``rots`` are
exactly this ``A``. cryoSPARC stores ``alignments3D/pose`` as a rotation vector (axis times
angle, the exponential map); cryoDRGN uses the transpose of its rotation matrix.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from distdrgn.errors import FormatError
from distdrgn.formats.cs import read_cs, require_fields
from distdrgn.formats.ind import read_pickle
from distdrgn.formats.star import numeric_columns, particles_with_optics, read_star

# sin(tilt) below this is a gimbal lock: rot and psi turn about the same axis.
_GIMBAL_EPS = 1e-7


def euler_to_rot(euler_deg: np.ndarray) -> np.ndarray:
    """RELION (rot, tilt, psi) in degrees, (N, 3) -> rotation matrices (N, 3, 3) float64."""
    euler = np.deg2rad(np.asarray(euler_deg, dtype=np.float64).reshape(-1, 3))
    ca, cb, cg = np.cos(euler).T
    sa, sb, sg = np.sin(euler).T
    R = np.empty((euler.shape[0], 3, 3))
    R[:, 0, 0] = cg * cb * ca - sg * sa
    R[:, 0, 1] = cg * cb * sa + sg * ca
    R[:, 0, 2] = -cg * sb
    R[:, 1, 0] = -sg * cb * ca - cg * sa
    R[:, 1, 1] = -sg * cb * sa + cg * ca
    R[:, 1, 2] = sg * sb
    R[:, 2, 0] = sb * ca
    R[:, 2, 1] = sb * sa
    R[:, 2, 2] = cb
    return R


def rot_to_euler(rots: np.ndarray) -> np.ndarray:
    """Inverse of :func:`euler_to_rot`: (N, 3, 3) -> (N, 3) (rot, tilt, psi) degrees.

    tilt is in [0, 180]; rot and psi in (-180, 180]. At tilt 0 or 180 only rot + psi
    (or rot - psi) is defined; psi is then set to 0.
    """
    R = np.asarray(rots, dtype=np.float64).reshape(-1, 3, 3)
    sin_tilt = np.hypot(R[:, 2, 0], R[:, 2, 1])
    tilt = np.arctan2(sin_tilt, R[:, 2, 2])
    rot = np.arctan2(R[:, 2, 1], R[:, 2, 0])
    psi = np.arctan2(R[:, 1, 2], -R[:, 0, 2])
    locked = sin_tilt < _GIMBAL_EPS
    if locked.any():
        # With sin(tilt) = 0: R[0, 0] = cos(rot +- psi) * sign, R[0, 1] = sin(rot +- psi) * sign.
        sign = np.sign(R[locked, 2, 2])
        rot[locked] = np.arctan2(sign * R[locked, 0, 1], sign * R[locked, 0, 0])
        psi[locked] = 0.0
    return np.rad2deg(np.stack([rot, tilt, psi], axis=1))


def axis_angle_to_rot(rotvec: np.ndarray) -> np.ndarray:
    """Rotation vectors (N, 3) (axis * angle in radians) -> matrices (N, 3, 3) float64.

    Rodrigues' formula ``I + sin(t) K + (1 - cos(t)) K^2`` with K the cross-product matrix
    of the unit axis; the active rotation by angle t about the axis.
    """
    v = np.asarray(rotvec, dtype=np.float64).reshape(-1, 3)
    theta = np.linalg.norm(v, axis=1)
    small = theta < 1e-12
    axis = v / np.where(small, 1.0, theta)[:, None]
    x, y, z = axis.T
    zero = np.zeros_like(x)
    K = np.stack([zero, -z, y, z, zero, -x, -y, x, zero], axis=1).reshape(-1, 3, 3)
    s = np.sin(theta)[:, None, None]
    c = np.cos(theta)[:, None, None]
    R = np.eye(3)[None] + s * K + (1 - c) * (K @ K)
    R[small] = np.eye(3)
    return R


def _rot_to_quat(R: np.ndarray) -> np.ndarray:
    """(N, 3, 3) -> unit quaternions (N, 4) as (w, x, y, z) with w >= 0 (Shepperd's method)."""
    m = R
    tr = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    cand = np.stack([tr, m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], axis=1)
    best = np.argmax(cand, axis=1)
    q = np.empty((R.shape[0], 4))
    for case in range(4):
        sel = best == case
        if not sel.any():
            continue
        a = m[sel]
        if case == 0:
            r = np.sqrt(1 + tr[sel]) * 2
            q[sel] = np.stack([r / 4, (a[:, 2, 1] - a[:, 1, 2]) / r, (a[:, 0, 2] - a[:, 2, 0]) / r,
                               (a[:, 1, 0] - a[:, 0, 1]) / r], axis=1)
        else:
            i = case - 1
            j, k = (i + 1) % 3, (i + 2) % 3
            r = np.sqrt(1 + a[:, i, i] - a[:, j, j] - a[:, k, k]) * 2
            qi = np.empty((a.shape[0], 4))
            qi[:, 0] = (a[:, k, j] - a[:, j, k]) / r
            qi[:, 1 + i] = r / 4
            qi[:, 1 + j] = (a[:, j, i] + a[:, i, j]) / r
            qi[:, 1 + k] = (a[:, k, i] + a[:, i, k]) / r
            q[sel] = qi
    q *= np.where(q[:, :1] < 0, -1.0, 1.0)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def rot_to_axis_angle(rots: np.ndarray) -> np.ndarray:
    """Inverse of :func:`axis_angle_to_rot`: (N, 3, 3) -> rotation vectors (N, 3), angle in [0, pi]."""
    q = _rot_to_quat(np.asarray(rots, dtype=np.float64).reshape(-1, 3, 3))
    vec_norm = np.linalg.norm(q[:, 1:], axis=1)
    angle = 2 * np.arctan2(vec_norm, q[:, 0])
    scale = np.where(vec_norm > 1e-12, angle / np.where(vec_norm > 1e-12, vec_norm, 1.0), 2.0)
    return q[:, 1:] * scale[:, None]


def pixel_size_column(table, path, purpose: str) -> np.ndarray:
    """Per-particle pixel size (A) from a (merged) star table: ``rlnImagePixelSize``, else
    ``rlnDetectorPixelSize`` (um) * 1e4 / ``rlnMagnification`` (RELION 3.0), else FormatError."""
    if "rlnImagePixelSize" in table.columns:
        return numeric_columns(table, "rlnImagePixelSize", path)
    if "rlnDetectorPixelSize" in table.columns and "rlnMagnification" in table.columns:
        return numeric_columns(table, "rlnDetectorPixelSize", path) * 1e4 / numeric_columns(table, "rlnMagnification", path)
    raise FormatError(
        f"{path}: no pixel size (_rlnImagePixelSize, or _rlnDetectorPixelSize and _rlnMagnification), "
        f"needed for {purpose}; pass --apix"
    )


def box_size_column(table, path, purpose: str) -> np.ndarray:
    """Per-particle box size from ``rlnImageSize`` (RELION 3.1+ optics), else FormatError."""
    if "rlnImageSize" in table.columns:
        return numeric_columns(table, "rlnImageSize", path)
    raise FormatError(f"{path}: no box size (_rlnImageSize), needed for {purpose}; pass -D")


def _require_columns(table, columns, path, purpose: str) -> None:
    for col in columns:
        if col not in table.columns:
            raise FormatError(f"{path}: no _{col} column, needed for {purpose}")


def poses_from_star_table(table, path, D: int | None, apix: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(rots, trans) float64 from a star particle table merged with its optics (``particles_with_optics``)."""
    _require_columns(table, ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"], path, "poses")
    rots = euler_to_rot(numeric_columns(table, ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"], path))
    box = np.full(len(table), float(D)) if D is not None else box_size_column(table, path, "translations")
    if "rlnOriginXAngst" in table.columns and "rlnOriginYAngst" in table.columns:
        angst = numeric_columns(table, ["rlnOriginXAngst", "rlnOriginYAngst"], path)
        px = np.full(len(table), float(apix)) if apix is not None else pixel_size_column(table, path, "translations in Angstrom")
        trans_px = angst / px[:, None]
    elif "rlnOriginX" in table.columns and "rlnOriginY" in table.columns:
        trans_px = numeric_columns(table, ["rlnOriginX", "rlnOriginY"], path)
    else:
        # A star without origins (e.g. from a projection simulator) has centred particles.
        trans_px = np.zeros((len(table), 2))
    return rots, trans_px / box[:, None]


def poses_from_cs_array(arr: np.ndarray, path, D: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(rots, trans) float64 from a cryoSPARC structured array (``path`` names it in errors)."""
    if "alignments3D/pose" not in arr.dtype.names:
        raise FormatError(f"{path}: has no 3D alignments (alignments3D/pose); export from a 3D refinement job")
    require_fields(arr, ["alignments3D/shift"], path, "translations")
    rots = axis_angle_to_rot(arr["alignments3D/pose"]).transpose(0, 2, 1)
    if D is None:
        require_fields(arr, ["blob/shape"], path, "the box size (or pass -D)")
        box = arr["blob/shape"][:, 0].astype(np.float64)
    else:
        box = np.full(len(arr), float(D))
    trans = arr["alignments3D/shift"].astype(np.float64) / box[:, None]
    return rots, trans


def parse_poses(path: str | os.PathLike, D: int | None, apix: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Poses of a RELION .star or cryoSPARC .cs file, as cryoDRGN parses them.

    D: box size in pixels, dividing the pixel translations (None: from the file's
    ``_rlnImageSize`` or ``blob/shape``). apix: Angstrom/pixel for RELION 3.1+ origins in
    Angstrom (None: the optics group's pixel size). Returns (rots (N, 3, 3), trans (N, 2))
    float32, trans as a fraction of the box.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".star":
        rots, trans = poses_from_star_table(particles_with_optics(read_star(path), path), path, D, apix)
    elif suffix == ".cs":
        rots, trans = poses_from_cs_array(read_cs(path), path, D)
    else:
        raise FormatError(f"{path}: unknown pose file type {suffix or '(no extension)'!r}; expected .star or .cs")
    return finite_poses(rots, trans, path)


def finite_poses(rots, trans, path) -> tuple[np.ndarray, np.ndarray]:
    """Parsed poses as float32, or FormatError if any angle or origin was not a number."""
    if not (np.isfinite(rots).all() and np.isfinite(trans).all()):
        raise FormatError(f"{path}: non-finite angles or origins")
    return rots.astype(np.float32), trans.astype(np.float32)


def check_poses(rots, trans, source) -> tuple[np.ndarray, np.ndarray]:
    """Validate (rots (N, 3, 3), trans (N, 2)) and return them as float32; FormatError naming ``source``."""
    rots = np.asarray(rots)
    trans = np.asarray(trans)
    if rots.ndim != 3 or rots.shape[1:] != (3, 3):
        raise FormatError(f"{source}: rotations have shape {rots.shape}, expected (N, 3, 3)")
    if trans.ndim != 2 or trans.shape[1] != 2:
        raise FormatError(f"{source}: translations have shape {trans.shape}, expected (N, 2)")
    if len(rots) != len(trans):
        raise FormatError(f"{source}: {len(rots)} rotations but {len(trans)} translations")
    rots = rots.astype(np.float32)
    trans = trans.astype(np.float32)
    if not (np.isfinite(rots).all() and np.isfinite(trans).all()):
        raise FormatError(f"{source}: non-finite values in poses")
    r64 = rots.astype(np.float64)
    ortho_err = np.abs(r64 @ r64.transpose(0, 2, 1) - np.eye(3)).max(initial=0.0)
    if ortho_err > 1e-3 or (len(rots) and np.linalg.det(r64).min() < 0):
        raise FormatError(f"{source}: rotations are not proper rotation matrices (|R R^T - I| up to {ortho_err:.2g})")
    return rots, trans


# A translation is the particle's offset as a fraction of the box: beyond half the box the
# particle's centre lies outside the image, which no refinement produces.
MAX_TRANSLATION = 0.5


def check_translation_scale(trans: np.ndarray, source, D: int | None = None) -> None:
    """FormatError if any translation (N, 2) exceeds half the box in x or y: such values are
    almost surely in pixels (poses parsed without dividing by the box size), not fractions."""
    trans = np.asarray(trans)
    if trans.size == 0:
        return
    size = np.abs(trans).max(axis=1)
    worst = int(np.argmax(size))
    if size[worst] > MAX_TRANSLATION:
        n_bad = int((size > MAX_TRANSLATION).sum())
        px = f" (at box {D}: {size[worst] * D:.3g} px)" if D else ""
        raise FormatError(
            f"{source}: translations must be fractions of the box (|t| <= {MAX_TRANSLATION}), but {n_bad} of "
            f"{len(trans)} exceed it, up to {size[worst]:.4g}{px} at row {worst} ({trans[worst, 0]:.4g}, "
            f"{trans[worst, 1]:.4g}); they look like pixels: were the poses parsed without dividing by the box "
            "size? (distdrgn parse-poses divides by it)")


def save_poses(path: str | os.PathLike, rots: np.ndarray, trans: np.ndarray) -> None:
    """Write cryoDRGN's ``poses.pkl``: a pickle of the tuple (rots, trans), float32."""
    rots, trans = check_poses(rots, trans, path)
    with open(path, "wb") as f:
        pickle.dump((rots, trans), f)


def load_poses(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a cryoDRGN ``poses.pkl`` -> (rots (N, 3, 3), trans (N, 2)) float32, validated."""
    obj = read_pickle(path, "poses")
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise FormatError(f"{path}: expected a pickled (rots, trans) pair, got {type(obj).__name__}")
    return check_poses(obj[0], obj[1], path)
