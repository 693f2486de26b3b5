"""Resolving what ``distdrgn ingest PARTICLES`` is given into images, poses and CTF.

Accepted inputs: an MRC stack (``.mrcs``/``.mrc``), a ``.txt`` list of stacks (one path
per line), a RELION ``.star`` (``rlnImageName`` = ``"000123@stack.mrcs"``, 1-based) or a
cryoSPARC ``.cs`` (``blob/path`` + 0-based ``blob/idx``). Stack paths are relative to the
metadata file's folder, or to ``datadir`` when given; a path not found there is tried as
``datadir/<basename>`` (cryoSPARC and RELION paths are often relative to a project
folder that has since moved).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from distdrgn.errors import FormatError
from distdrgn.formats.cs import read_cs, require_fields
from distdrgn.formats.ctf_params import check_ctf, ctf_from_cs_array, ctf_from_star_table
from distdrgn.formats.mrc import MrcStack, open_mrc
from distdrgn.formats.poses import finite_poses, poses_from_cs_array, poses_from_star_table
from distdrgn.formats.star import particles_with_optics, read_star

STACK_SUFFIXES = (".mrcs", ".mrc")


@dataclass
class ParticleSource:
    """``n`` particle images of box ``D`` spread over ``stacks``, with metadata.

    Dataset position ``i`` is image ``index_in_stack[i]`` (0-based) of
    ``stacks[stack_id[i]]``. ``poses`` is (rots (n, 3, 3), trans (n, 2)) and ``ctf`` is
    (n, 9) when the metadata had them. ``source_files`` lists every file read (metadata
    first, then stacks), for provenance.
    """

    n: int
    D: int
    apix: float | None
    stacks: list[MrcStack]
    stack_id: np.ndarray
    index_in_stack: np.ndarray
    poses: tuple[np.ndarray, np.ndarray] | None
    ctf: np.ndarray | None
    source_files: list[Path]
    kind: str

    def __len__(self) -> int:
        return self.n

    def read(self, positions) -> np.ndarray:
        """Images at dataset ``positions`` (int array/list or slice), in that order: (k, D, D) float32.

        Positions are grouped by stack so that each stack is opened once and each run of
        consecutive images in it is read with one seek + read.
        """
        if isinstance(positions, slice):
            positions = np.arange(self.n)[positions]
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if pos.size and (pos.min() < 0 or pos.max() >= self.n):
            raise IndexError(f"particle position out of range for {self.n} particles")
        out = np.empty((pos.size, self.D, self.D), dtype=np.float32)
        sids = self.stack_id[pos]
        for sid in np.unique(sids):
            where = np.flatnonzero(sids == sid)
            out[where] = self.stacks[sid].read(self.index_in_stack[pos[where]])
        return out


def _candidates(name: str, base: Path, datadir: Path | None) -> list[Path]:
    p = Path(name)
    found = []
    if p.is_absolute():
        found.append(p)
    elif datadir is not None:
        found.append(datadir / p)
    else:
        found.append(base / p)
    if datadir is not None:
        found.append(datadir / p.name)
    return found


def _resolve_stack_path(name: str, base: Path, datadir: Path | None, meta: Path) -> Path:
    tried = _candidates(name, base, datadir)
    for cand in tried:
        if cand.is_file():
            return cand
    raise FormatError(
        f"{meta}: particle stack {name!r} not found (tried {', '.join(str(t) for t in tried)}); "
        f"pass --datadir with the folder that holds the stacks"
    )


def _open_stacks(names: list[str], base: Path, datadir: Path | None, meta: Path) -> list[MrcStack]:
    return [open_mrc(_resolve_stack_path(name, base, datadir, meta)) for name in names]


def _check_stacks(stacks: list[MrcStack], meta: Path) -> int:
    """The common box size of ``stacks``; FormatError if they differ."""
    sizes = {s.D for s in stacks}
    if len(sizes) > 1:
        by_size = {}
        for s in stacks:
            by_size.setdefault(s.D, s.path)
        detail = ", ".join(f"{p.name}: {d}" for d, p in sorted(by_size.items()))
        raise FormatError(f"{meta}: stacks have different box sizes ({detail})")
    return sizes.pop()


def _check_indices(stacks, stack_id, index_in_stack, meta: Path, one_based: bool) -> None:
    lengths = np.array([s.n for s in stacks], dtype=np.int64)
    bad = (index_in_stack < 0) | (index_in_stack >= lengths[stack_id])
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        stack = stacks[stack_id[row]]
        shown = index_in_stack[row] + (1 if one_based else 0)
        raise FormatError(
            f"{meta}: row {row} points to image {shown} ({'1' if one_based else '0'}-based) "
            f"of {stack.path}, which has {stack.n} images"
        )


def _whole_stacks(stacks: list[MrcStack]) -> tuple[np.ndarray, np.ndarray]:
    stack_id = np.concatenate([np.full(s.n, i, dtype=np.int32) for i, s in enumerate(stacks)])
    index = np.concatenate([np.arange(s.n, dtype=np.int64) for s in stacks])
    return stack_id, index


def _common_apix(stacks: list[MrcStack]) -> float | None:
    values = {s.apix for s in stacks}
    return values.pop() if len(values) == 1 else None


def _from_names(
    image_stack_names, index_in_stack: np.ndarray, meta: Path, datadir: Path | None, one_based: bool
):
    """Stacks (in order of first appearance), stack_id and index for per-particle stack names."""
    codes, names = pd.factorize(pd.Series(image_stack_names, dtype=object), sort=False)
    stacks = _open_stacks([str(n) for n in names], meta.parent, datadir, meta)
    stack_id = codes.astype(np.int32)
    _check_indices(stacks, stack_id, index_in_stack, meta, one_based)
    return stacks, stack_id, index_in_stack


def _split_image_names(values: pd.Series, meta: Path) -> tuple[pd.Series, np.ndarray]:
    """``"000123@path"`` entries -> (paths, 0-based indices)."""
    text = values.astype(str)
    parts = text.str.partition("@")
    number, sep, name = parts[0], parts[1], parts[2]
    malformed = (sep != "@") | (name == "")
    index = pd.to_numeric(number.where(~malformed), errors="coerce")
    bad = malformed | index.isna() | (index != index.round())
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise FormatError(
            f"{meta}: row {row}: _rlnImageName {text.iloc[row]!r} is not of the form 'N@stack.mrcs'"
        )
    return name, index.to_numpy(np.int64) - 1


def _resolve_star(path: Path, datadir, D_hint, ctf_options, with_poses, with_ctf) -> ParticleSource:
    star = read_star(path)
    if "rlnImageName" not in star.particles.columns:
        raise FormatError(f"{path}: no _rlnImageName column, so no particle images")
    names, index = _split_image_names(star.particles["rlnImageName"], path)
    stacks, stack_id, index = _from_names(names, index, path, datadir, one_based=True)
    D = _check_stacks(stacks, path)
    table = particles_with_optics(star, path)
    box = D_hint or D
    poses = ctf = None
    if with_poses and "rlnAngleRot" in table.columns:
        poses = finite_poses(*poses_from_star_table(table, path, box, ctf_options.get("apix")), path)
    if with_ctf and "rlnDefocusU" in table.columns:
        ctf = ctf_from_star_table(table, path, D=box, **ctf_options)
    return _source(path, "star", stacks, stack_id, index, D, poses, ctf, ctf_options.get("apix"))


def _resolve_cs(path: Path, datadir, D_hint, ctf_options, with_poses, with_ctf) -> ParticleSource:
    arr = read_cs(path)
    require_fields(arr, ["blob/path", "blob/idx"], path, "finding the particle images")
    if len(arr) == 0:
        raise FormatError(f"{path}: no particles")
    # decode only the distinct paths (millions of rows share a few thousand stacks);
    # cryoSPARC marks imported paths with a leading '>'
    raw_codes, raw_names = pd.factorize(arr["blob/path"].astype(object), sort=False)
    decoded = [(p.decode() if isinstance(p, bytes) else str(p)).removeprefix(">") for p in raw_names]
    names = np.asarray(decoded, dtype=object)[raw_codes]
    index = arr["blob/idx"].astype(np.int64)
    stacks, stack_id, index = _from_names(names, index, path, datadir, one_based=False)
    D = _check_stacks(stacks, path)
    box = D_hint or D
    poses = ctf = None
    if with_poses and "alignments3D/pose" in arr.dtype.names:
        poses = finite_poses(*poses_from_cs_array(arr, path, box), path)
    if with_ctf and "ctf/df1_A" in arr.dtype.names:
        ctf = ctf_from_cs_array(arr, path, D=box, **ctf_options)
    return _source(path, "cs", stacks, stack_id, index, D, poses, ctf, ctf_options.get("apix"))


def _resolve_txt(path: Path, datadir, apix) -> ParticleSource:
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    names = [ln for ln in lines if ln and not ln.startswith("#")]
    if not names:
        raise FormatError(f"{path}: lists no particle stacks")
    stacks = _open_stacks(names, path.parent, datadir, path)
    D = _check_stacks(stacks, path)
    stack_id, index = _whole_stacks(stacks)
    return _source(path, "txt", stacks, stack_id, index, D, None, None, apix)


def _source(meta, kind, stacks, stack_id, index, D, poses, ctf, apix=None) -> ParticleSource:
    """Assemble a ParticleSource; ``ctf`` is the float64 parse (validated and cast here)."""
    n = len(stack_id)
    if n == 0:
        raise FormatError(f"{meta}: no particles")
    if apix is None and ctf is not None:
        # several optics groups may differ; then there is no single pixel size
        apix = float(ctf[0, 1]) if np.all(ctf[:, 1] == ctf[0, 1]) else None
    elif apix is None:
        apix = _common_apix(stacks)
    if ctf is not None:
        ctf = check_ctf(ctf, meta)
    files = [] if kind == "mrcs" else [Path(meta)]
    files += [s.path for s in stacks]
    return ParticleSource(
        n=n, D=D, apix=apix, stacks=stacks, stack_id=np.asarray(stack_id, dtype=np.int32),
        index_in_stack=np.asarray(index, dtype=np.int64), poses=poses, ctf=ctf, source_files=files, kind=kind,
    )


def resolve_particles(
    path: str | os.PathLike,
    datadir: str | os.PathLike | None = None,
    D_hint: int | None = None,
    *,
    apix: float | None = None,
    kv: float | None = None,
    cs: float | None = None,
    w: float | None = None,
    ps: float | None = None,
    with_poses: bool = True,
    with_ctf: bool = True,
) -> ParticleSource:
    """Find the images (and poses/CTF, from a .star or .cs) described by ``path``.

    datadir: folder holding the stacks, for metadata whose paths are relative to somewhere
    else. D_hint: box size in which the metadata's pixel origins and CTF box are expressed
    (default: the stacks' box). apix, kv, cs, w, ps: CTF values overriding (or supplying,
    when the file lacks them) those of the metadata; apix also converts RELION 3.1 origins
    in Angstrom. with_poses / with_ctf: parse the poses / CTF of a .star or .cs (turn off
    when they come from elsewhere, e.g. a poses.pkl or ctf.pkl, so that fields the file
    lacks are not an error). Raises FormatError (one line) for anything that cannot be used.
    """
    path = Path(path)
    datadir = Path(datadir) if datadir is not None else None
    if datadir is not None and not datadir.is_dir():
        raise FormatError(f"{datadir}: --datadir is not a folder")
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    suffix = path.suffix.lower()
    ctf_options = dict(apix=apix, kv=kv, cs=cs, w=w, ps=ps)
    if suffix in STACK_SUFFIXES:
        stacks = [open_mrc(path)]
        stack_id, index = _whole_stacks(stacks)
        return _source(path, "mrcs", stacks, stack_id, index, stacks[0].D, None, None, apix)
    if suffix == ".txt":
        return _resolve_txt(path, datadir, apix)
    if suffix == ".star":
        return _resolve_star(path, datadir, D_hint, ctf_options, with_poses, with_ctf)
    if suffix == ".cs":
        return _resolve_cs(path, datadir, D_hint, ctf_options, with_poses, with_ctf)
    raise FormatError(
        f"{path}: unknown particle file type {suffix or '(no extension)'!r}; expected .mrcs, .mrc, .txt, .star or .cs"
    )
