"""``distdrgn store export``: a store (or a subset of it) back to .mrcs, RELION .star or cryoSPARC .cs.

By default a .star/.cs target gets the particles' original rows from the source .star/.cs
(kept in the store at ingest, see source_table.py): every column, the user's own stacks.
With ``new_stack`` (below), images are streamed through :class:`distdrgn.formats.mrc.MrcStackWriter` one chunk at a
time. For a .star/.cs target the stack is written beside it as ``OUT.mrcs`` and referenced by
file name, so ``distdrgn ingest OUT.star`` (or ``OUT.cs``) reads it back: images are
bit-identical for float32 stores; CTF values of a .star come back exactly (numbers are
written as shortest round-trip decimals); poses go through Euler angles (.star) or rotation
vectors (.cs) and come back to within float32 rounding, as do the .cs CTF angles (radians).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distdrgn.errors import FormatError, StoreError
from distdrgn.formats.ind import load_indices
from distdrgn.store.reader import ParticleStore


def _load_positions(ind, n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) if ind is None else load_indices(ind, n)


def _write_stack(store: ParticleStore, positions: np.ndarray, path: Path, progress: bool) -> None:
    from tqdm import tqdm

    from distdrgn.formats.mrc import MrcStackWriter

    batch = store.chunk_images
    contiguous = np.array_equal(positions, np.arange(store.n))
    with MrcStackWriter(path, len(positions), store.D, store.apix, np.float32) as writer:
        for i in tqdm(range(0, len(positions), batch), desc="export", unit="chunk", disable=not progress):
            if contiguous:
                writer.write(store.read_chunk(i // batch))
            else:
                writer.write(store.images(positions[i : i + batch]))


def _ctf_at_level(store: ParticleStore, positions: np.ndarray) -> np.ndarray | None:
    """CTF rows of ``positions`` with box/pixel size of the exported images."""
    if store.ctf is None:
        return None
    ctf = store.ctf[positions].astype(np.float64)
    ctf[:, 1] = ctf[:, 1] * ctf[:, 0] / store.D
    ctf[:, 0] = store.D
    return ctf


def _exact_text(values: np.ndarray, dtype) -> list[str]:
    """Shortest decimal strings that parse back to exactly ``values`` in ``dtype``.

    The star writer's fixed 6-decimal format would round e.g. a float32 defocus angle of
    7.5603867 to 7.560387; strings are written verbatim, so the round trip stays exact.
    """
    values = np.asarray(values).astype(dtype)
    return [np.format_float_positional(v, unique=True, trim="0") for v in values]


def _poses_at(store: ParticleStore, positions: np.ndarray, poses) -> tuple[np.ndarray, np.ndarray] | None:
    """(rots, trans) of ``positions``: from ``poses`` (a poses.pkl's arrays, one row per store
    particle) when given, else the store's own; None when there are none."""
    if poses is None:
        if store.poses is None:
            return None
        rots, trans = store.poses
        return np.asarray(rots)[positions], (np.zeros((len(positions), 2)) if trans is None else np.asarray(trans)[positions])
    rots, trans = poses
    return np.asarray(rots)[positions], np.asarray(trans)[positions]


def _star_tables(store: ParticleStore, positions: np.ndarray, stack_name: str, poses=None):
    import pandas as pd

    k = len(positions)
    particles = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@{stack_name}" for i in range(k)]})
    ctf = _ctf_at_level(store, positions)
    apix = ctf[:, 1] if ctf is not None else np.full(k, store.apix if store.apix else 1.0)
    if ctf is not None:
        keys = np.stack([ctf[:, 1], ctf[:, 5], ctf[:, 6], ctf[:, 7]], axis=1)
    else:
        keys = apix[:, None]
    uniq, group = np.unique(keys, axis=0, return_inverse=True)
    group = group.reshape(-1)
    optics = pd.DataFrame({
        "rlnOpticsGroup": np.arange(1, len(uniq) + 1),
        "rlnOpticsGroupName": [f"opticsGroup{g + 1}" for g in range(len(uniq))],
        "rlnImagePixelSize": _exact_text(uniq[:, 0], np.float32),
        "rlnImageSize": np.full(len(uniq), store.D),
        "rlnImageDimensionality": np.full(len(uniq), 2),
    })
    if ctf is not None:
        optics["rlnVoltage"] = _exact_text(uniq[:, 1], np.float32)
        optics["rlnSphericalAberration"] = _exact_text(uniq[:, 2], np.float32)
        optics["rlnAmplitudeContrast"] = _exact_text(uniq[:, 3], np.float32)
    chosen = _poses_at(store, positions, poses)
    if chosen is not None:
        _set_star_poses(particles, *chosen, store.D, apix, angstrom=True)
    if ctf is not None:
        for col, name in ((2, "rlnDefocusU"), (3, "rlnDefocusV"), (4, "rlnDefocusAngle"), (8, "rlnPhaseShift")):
            particles[name] = _exact_text(ctf[:, col], np.float32)
    particles["rlnOpticsGroup"] = group + 1
    return particles, optics


def _set_star_poses(particles, rots: np.ndarray, trans: np.ndarray, box, apix: np.ndarray, angstrom: bool) -> None:
    """Write Euler angles and origins (Angstrom, RELION 3.1+, or pixels, RELION 3.0) into a star
    particle table, in place: the inverse of :func:`distdrgn.formats.poses.poses_from_star_table`."""
    from distdrgn.formats.poses import rot_to_euler

    euler = rot_to_euler(rots)
    particles["rlnAngleRot"] = _exact_text(euler[:, 0], np.float64)
    particles["rlnAngleTilt"] = _exact_text(euler[:, 1], np.float64)
    particles["rlnAnglePsi"] = _exact_text(euler[:, 2], np.float64)
    shift_px = trans.astype(np.float64) * np.asarray(box, np.float64).reshape(-1, 1)
    if angstrom:
        shift = shift_px * apix[:, None]
        particles["rlnOriginXAngst"] = _exact_text(shift[:, 0], np.float64)
        particles["rlnOriginYAngst"] = _exact_text(shift[:, 1], np.float64)
    else:
        particles["rlnOriginX"] = _exact_text(shift_px[:, 0], np.float64)
        particles["rlnOriginY"] = _exact_text(shift_px[:, 1], np.float64)


def _set_cs_poses(arr: np.ndarray, rots: np.ndarray, trans: np.ndarray, box, apix: np.ndarray) -> np.ndarray:
    """``arr`` with its ``alignments3D/`` pose and shift set (fields added when missing)."""
    from distdrgn.formats.poses import rot_to_axis_angle

    wanted = [("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,)), ("alignments3D/psize_A", "<f4")]
    missing = [f for f in wanted if f[0] not in arr.dtype.names]
    if missing:
        grown = np.zeros(len(arr), dtype=arr.dtype.descr + missing)
        for name in arr.dtype.names:
            grown[name] = arr[name]
        arr = grown
        if ("alignments3D/psize_A", "<f4") in missing:
            arr["alignments3D/psize_A"] = apix
    # cryoDRGN's rots are the transpose of cryoSPARC's rotation (docs/conventions.md)
    arr["alignments3D/pose"] = rot_to_axis_angle(rots.transpose(0, 2, 1))
    arr["alignments3D/shift"] = trans.astype(np.float64) * np.asarray(box, np.float64).reshape(-1, 1)
    return arr


def _cs_array(store: ParticleStore, positions: np.ndarray, stack_name: str, poses=None) -> np.ndarray:
    k = len(positions)
    fields = [("uid", "<u8"), ("blob/path", f"S{len(stack_name.encode()) + 1}"), ("blob/idx", "<u4"),
              ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4")]
    ctf = _ctf_at_level(store, positions)
    if ctf is not None:
        fields += [(f"ctf/{name}", "<f4") for name in
                   ("accel_kv", "cs_mm", "amp_contrast", "df1_A", "df2_A", "df_angle_rad", "phase_shift_rad")]
    arr = np.zeros(k, dtype=fields)
    arr["uid"] = store.original_index[positions]
    arr["blob/path"] = stack_name.encode()
    arr["blob/idx"] = np.arange(k)
    arr["blob/shape"] = store.D
    apix = ctf[:, 1] if ctf is not None else np.full(k, store.apix if store.apix else 1.0)
    arr["blob/psize_A"] = apix
    if ctf is not None:
        arr["ctf/df1_A"], arr["ctf/df2_A"] = ctf[:, 2], ctf[:, 3]
        arr["ctf/df_angle_rad"] = np.deg2rad(ctf[:, 4])
        arr["ctf/accel_kv"], arr["ctf/cs_mm"], arr["ctf/amp_contrast"] = ctf[:, 5], ctf[:, 6], ctf[:, 7]
        arr["ctf/phase_shift_rad"] = np.deg2rad(ctf[:, 8])
    chosen = _poses_at(store, positions, poses)
    if chosen is not None:
        arr = _set_cs_poses(arr, *chosen, store.D, apix)
    return arr


def _original_rows(store: ParticleStore, positions: np.ndarray, out: Path, suffix: str, level, store_path,
                   poses=None) -> None:
    """Write the source .star/.cs rows of ``positions`` (every column, original image names);
    with ``poses``, their pose columns replaced by those poses (at the source box)."""
    from distdrgn.store.source_table import read_cs_rows, read_star_rows

    kind = store.attrs.get("kind")
    if kind not in ("star", "cs"):
        raise StoreError(f"{store_path}: the store was made from {'.' + kind if kind else 'image stacks'} files, not a .star/.cs, "
                         f"so there are no original rows to write; use --new-stack to write {out.name} with a new stack")
    if suffix != f".{kind}":
        raise StoreError(f"{store_path}: the store was made from a .{kind}, so its original rows can only be written "
                         f"as .{kind}; use --new-stack to write a {suffix} with a new stack")
    if level is not None:
        raise StoreError(f"{store_path}: --level picks the box of exported images, but the original rows point at the "
                         f"source stacks (box {store.attrs.get('source_D')}); use --new-stack to export images at box {level}")
    if kind == "star":
        from distdrgn.formats.star import write_star

        particles, optics, version, block = read_star_rows(store_path, positions)
        if poses is not None:
            # RELION 3.1+ (an optics table) keeps origins in Angstrom, 3.0 in pixels; a file's own choice wins
            angstrom = "rlnOriginXAngst" in particles.columns or (optics is not None and "rlnOriginX" not in particles.columns)
            _set_star_poses(particles, *_poses_at(store, positions, poses), store.attrs.get("source_D") or store.D,
                            _source_apix(store, positions), angstrom)
        write_star(out, particles, optics, version=version, particles_block=block)
    else:
        from distdrgn.formats.cs import write_cs

        rows = read_cs_rows(store_path, positions)
        if poses is not None:
            box = rows["blob/shape"][:, 0] if "blob/shape" in rows.dtype.names else (store.attrs.get("source_D") or store.D)
            rows = _set_cs_poses(rows, *_poses_at(store, positions, poses), box, _source_apix(store, positions))
        write_cs(out, rows)


def _source_apix(store: ParticleStore, positions: np.ndarray) -> np.ndarray:
    """Pixel size (A) of the source images of ``positions``: the CTF's, else the store's."""
    ctf = store.ctf
    if ctf is not None:
        return np.asarray(ctf, np.float64)[positions, 1]
    return np.full(len(positions), float(store.apix or 1.0))


def export(store_path, out, *, ind=None, level: int | None = None, force: bool = False, progress: bool = True,
           new_stack: bool = False, poses=None) -> list[Path]:
    """Write the store's particles (positions ``ind``, default all) to ``out``.

    ``out`` ending in .mrcs/.mrc: the images at ``level``, as a stack. .star/.cs: the
    particles' original rows of the source .star/.cs (every column, in the original order,
    image names pointing at the original stacks; for a star the original optics table too).
    ``new_stack``: instead write the images to ``OUT.mrcs`` and a .star (RELION 3.1, with
    poses/CTF) or .cs (``blob/``, ``ctf/``, ``alignments3D/`` fields) describing them; the
    only choice for stores made from bare stacks. ``poses``: a poses.pkl (e.g. ``distdrgn abinit``'s
    or a pose-refined run's) whose poses replace the store's in the written .star/.cs; one row
    per store particle, or per particle of ``ind`` (the rows a run on that subset writes).
    Returns the files written.
    """
    from distdrgn.formats.cs import write_cs
    from distdrgn.formats.star import write_star

    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".mrcs", ".mrc", ".star", ".cs"):
        raise FormatError(f"{out}: unknown output type {suffix or '(no extension)'!r}; expected .mrcs, .star or .cs")
    store = ParticleStore.open(store_path, level)
    positions = _load_positions(ind, store.n)
    if poses is not None:
        poses = _poses_for_store(poses, store, positions)
    originals = suffix in (".star", ".cs") and not new_stack
    stack = out if suffix in (".mrcs", ".mrc") else out.with_suffix(".mrcs")
    targets = [out] if originals else [stack] if stack == out else [stack, out]
    for t in targets:
        if t.exists() and not force:
            raise StoreError(f"{t}: already exists; use --force to overwrite")
    if not out.parent.is_dir():
        raise StoreError(f"{out.parent}: output directory does not exist")
    if originals:
        _original_rows(store, positions, out, suffix, level, store_path, poses)
        return targets
    _write_stack(store, positions, stack, progress)
    if suffix == ".star":
        particles, optics = _star_tables(store, positions, stack.name, poses)
        write_star(out, particles, optics)
    elif suffix == ".cs":
        write_cs(out, _cs_array(store, positions, stack.name, poses))
    return targets


def _poses_for_store(path, store: ParticleStore, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A poses.pkl as one row per store particle: as it is (n rows), or spread over the sorted
    ``positions`` it was trained on (a run with data.ind writes one row per particle of it)."""
    from distdrgn.formats.poses import load_poses

    rots, trans = load_poses(path)
    if len(rots) == store.n:
        return rots, trans
    subset = np.unique(positions)
    if len(rots) == len(subset):
        full_rots, full_trans = np.zeros((store.n, 3, 3), np.float32), np.zeros((store.n, 2), np.float32)
        full_rots[subset], full_trans[subset] = rots, trans
        return full_rots, full_trans
    raise StoreError(f"{path}: {len(rots)} poses, but the store has {store.n} particles and --ind selects "
                     f"{len(subset)}; give the poses.pkl of a run on this store (and its data.ind)")
