"""``ingest``: particle stacks + poses + CTF -> a Zarr v3 particle store.

How it stays safe and small:

* Everything is written into ``STORE.zarr.partial`` beside the target; the last steps set
  ``complete: true`` in the attributes and rename the directory to ``STORE.zarr``. A reader
  refuses anything else.
* The images are written by independent dask tasks, one per shard (all levels of an image
  range share shard boundaries, so no two tasks touch the same file). A task reads only its
  images from the source, checks they are finite, Fourier-crops them for lower levels,
  writes them, and drops a small JSON record (chunk checksums, normalisation sums) into
  ``progress/``. Peak memory is a few shards per worker, independent of the dataset size.
* Re-running the same ingest on a leftover ``.partial`` skips shards that have a record.
  The partial remembers the request (inputs' fingerprints and options); a different request
  is refused unless ``force``.
* A problem with the input (non-finite pixels, ...) found mid-way removes the partial;
  an interruption or I/O error keeps it for resuming.
* ``allow_nonfinite`` stores images with NaN/inf pixels instead of refusing them (to test how
  training copes); the store then records ``allow_nonfinite: true`` and the positions of
  those images (``nonfinite``), which ``store verify`` reports as a warning. They are left
  out of the normalisation statistics.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from distdrgn import __version__
from distdrgn.errors import DistdrgnError, FormatError, StoreError
from distdrgn.fft import downsample
from distdrgn.formats.ind import load_indices
from distdrgn.store import layout as L
from distdrgn.store.checksums import chunk_crc32c, crc32c_array, file_fingerprint
from distdrgn.store.norm import combine, partial_sums, sample_positions


def _load_ind(ind, n: int) -> tuple[np.ndarray, dict | None]:
    """``ind`` (pickle path or int array) -> validated int64 positions, and its fingerprint."""
    arr = load_indices(ind, n)
    if isinstance(ind, (str, os.PathLike)):
        return arr, file_fingerprint(ind)
    return arr, {"crc32c": f"{crc32c_array(arr):08x}", "n": int(arr.size)}


def _load_poses(poses, n: int):
    from distdrgn.formats.poses import load_poses

    rots, trans = load_poses(poses)
    rots = np.asarray(rots, dtype=np.float32)
    trans = None if trans is None else np.asarray(trans, dtype=np.float32)
    if rots.shape != (n, 3, 3) or (trans is not None and trans.shape != (n, 2)):
        got = f"rots {rots.shape}" + ("" if trans is None else f", trans {trans.shape}")
        raise FormatError(f"{poses}: poses are for a different number of particles ({got}) than the {n} images")
    return rots, trans


def _load_ctf(ctf, n: int) -> np.ndarray:
    from distdrgn.formats.ctf_params import load_ctf

    arr = np.asarray(load_ctf(ctf), dtype=np.float32)
    if arr.shape != (n, 9):
        raise FormatError(f"{ctf}: CTF parameters have shape {arr.shape}, expected ({n}, 9) for {n} images")
    return arr


def _check_metadata_against_images(particles, poses, ctf, source, original_index, trans, ctf_arr) -> None:
    """Poses and CTF that have the right count but do not fit the images: translations of a
    poses.pkl in pixels (FormatError), CTF rows of another box / pixel size (FormatError when grossly
    inconsistent, else a warning on stderr). Only the ingested rows are checked."""
    import sys

    from distdrgn.formats.ctf_params import check_ctf_matches_images
    from distdrgn.formats.poses import check_translation_scale

    if poses is not None and trans is not None:
        # only a poses.pkl: translations parsed here from a .star/.cs were divided by the box
        # by distdrgn's own parser (and test fixtures pair real origins with tiny stacks)
        check_translation_scale(trans[original_index], poses, int(source.D))
    if ctf_arr is not None:
        apix = None if source.apix is None else float(source.apix)
        warning = check_ctf_matches_images(ctf_arr[original_index], int(source.D), apix,
                                           ctf if ctf is not None else particles, particles)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)


@dataclass
class _Job:
    """Everything a shard task needs (picklable for the processes scheduler)."""

    source: object
    partial: Path
    original_index: np.ndarray
    full_D: int
    source_D: int
    levels: list[int]
    plan: dict
    dtype: str
    sample: np.ndarray
    label: str
    allow_nonfinite: bool = False
    shard_ids: list[int] = field(default_factory=list)


def _progress_path(partial: Path, shard: int) -> Path:
    return partial / L.PROGRESS_DIR / f"shard_{shard:07d}.json"


def _downsample_blocks(images: np.ndarray, d: int, block: int) -> np.ndarray:
    """Fourier-crop (k, D, D) -> (k, d, d) a block at a time (the transform works in float64)."""
    out = np.empty((len(images), d, d), dtype=np.float32)
    for i in range(0, len(images), block):
        out[i : i + block] = downsample(images[i : i + block], d)
    return out


def _write_shard(job: _Job, shard: int) -> int:
    shard_images = job.plan[job.full_D].shard_images
    start = shard * shard_images
    stop = min(len(job.original_index), start + shard_images)
    orig = job.original_index[start:stop]
    # read a chunk at a time into one shard buffer: the source reader's temporaries stay small
    block = job.plan[job.full_D].chunk_images
    images = np.empty((stop - start, job.source_D, job.source_D), dtype=np.float32)
    finite = np.ones(stop - start, dtype=bool)
    for i in range(0, stop - start, block):
        images[i : i + block] = job.source.read(orig[i : i + block])
        finite[i : i + block] = np.isfinite(images[i : i + block]).all(axis=(1, 2))
        if not job.allow_nonfinite and not finite[i : i + block].all():
            bad = int(orig[i + np.argmin(finite[i : i + block])])
            raise FormatError(f"{job.label}: particle {bad} has non-finite (NaN or inf) pixels "
                              "(--allow-nonfinite stores such images anyway, for testing)")
    record = {"shard": shard, "start": start, "stop": stop, "levels": {},
              "nonfinite": (start + np.flatnonzero(~finite)).tolist()}
    in_sample = job.sample[(job.sample >= start) & (job.sample < stop)] - start
    in_sample = in_sample[finite[in_sample]]  # a NaN image would poison the statistics
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite images are stored as they are (allow_nonfinite)
        for d in job.levels:
            values = images if d == job.source_D else _downsample_blocks(images, d, job.plan[job.full_D].chunk_images)
            stored = values.astype(job.dtype, copy=False)
            if job.dtype != "float32" and not np.isfinite(stored[finite]).all():
                raise FormatError(f"{job.label}: pixel values overflow {job.dtype} at box {d}; ingest with --dtype float32")
            _store_level(job, d, start, stop, stored, in_sample, record)
            del values, stored
    path = _progress_path(job.partial, shard)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
    return shard


def _store_level(job: _Job, d: int, start: int, stop: int, stored: np.ndarray, in_sample: np.ndarray, record: dict):
    """Write one level of a shard and add its chunk checksums and normalisation sums to ``record``."""
    arr = zarr.open_array(job.partial / L.images_name(d, job.full_D), mode="r+")
    arr[start:stop] = stored
    record["levels"][str(d)] = {
        "crc32c": chunk_crc32c(stored, job.plan[d].chunk_images),
        "norm_sums": partial_sums(stored[in_sample].astype(np.float32)),
    }


def _looks_like_store(path: Path) -> bool:
    return (path / "zarr.json").is_file()


def _is_distdrgn_store(path: Path) -> bool:
    """A real directory whose root zarr.json is a distdrgn particle-store group (complete or not)."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(meta, dict) and meta.get("node_type") == "group"
            and isinstance(meta.get("attributes"), dict) and meta["attributes"].get("format") == L.FORMAT_NAME)


def _check_replaceable(path: Path, inputs) -> None:
    """StoreError unless ``path`` (about to be removed for --force) is a distdrgn store holding none of ``inputs``."""
    real = path.resolve()
    for p in inputs:
        rp = Path(p).resolve()
        if rp == real or real in rp.parents:
            raise StoreError(f"{path}: is (or holds) the input {p} of this ingest; refusing to delete it even with --force")
    if not _is_distdrgn_store(path):
        raise StoreError(f"{path}: exists and is not a distdrgn particle store; refusing to delete it even with --force")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _run_tasks(job: _Job, todo: list[int], workers: int, scheduler: str, progress: bool, total: int) -> None:
    import dask
    from dask.callbacks import Callback
    from tqdm import tqdm

    # dask_key_name names the task itself (delayed(..., name=) would only name the function,
    # and the bar, matching on the key, stayed at 0 until the end)
    tasks = [dask.delayed(_write_shard, pure=False)(job, s, dask_key_name=f"ingest-shard-{s}") for s in todo]
    n = len(job.original_index)
    shard_images = job.plan[job.full_D].shard_images

    def images_of(shard: int) -> int:
        return min(n, (shard + 1) * shard_images) - shard * shard_images

    # counted in images, as each shard task finishes (a shard is the unit of work and of resuming)
    bar = tqdm(total=n, initial=n - sum(images_of(s) for s in todo), unit="img", unit_scale=True,
               desc=f"ingest ({total} shards)", disable=not progress)

    class _Bar(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if str(key).startswith("ingest-shard-"):
                bar.update(images_of(int(result)))

    # Our own executor, so that on a failure we can wait for the shards still being written
    # before the caller removes the partial store (dask returns at the first exception).
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    pool = (ProcessPoolExecutor if scheduler == "processes" else ThreadPoolExecutor)(max_workers=workers)
    try:
        with _Bar():
            dask.compute(*tasks, scheduler=scheduler, num_workers=workers, pool=pool)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def ingest(
    particles,
    out,
    *,
    poses=None,
    ctf=None,
    datadir=None,
    D: int | None = None,
    dtype: str = "float32",
    ind=None,
    extra_levels=(),
    force: bool = False,
    workers: int | None = None,
    progress: bool = True,
    codec: str = L.DEFAULT_CODEC,
    scheduler: str = "threads",
    layout_overrides: dict | None = None,
    metadata_options: dict | None = None,
    allow_nonfinite: bool = False,
) -> Path:
    """Write a particle store at ``out`` from ``particles`` (.mrcs/.mrc/.txt/.star/.cs).

    ``poses``/``ctf``: cryoDRGN pickles overriding those in a .star/.cs. ``D``: Fourier-crop
    to this box (even, <= the source box). ``ind``: pickle path or array of source indices
    to keep (store order = ``ind`` order). ``extra_levels``: further lower box sizes stored
    as ``images_<d>``. ``workers``: parallel shard tasks (default: one per CPU, at most 8,
    fewer if their shards would need more than ``layout.INGEST_MEMORY_BUDGET``).
    ``codec``/``scheduler``/``layout_overrides`` (kwargs of :func:`layout.plan_layout`) are
    for benchmarks. ``metadata_options``: ``apix``, ``kv``, ``cs``, ``w``, ``ps`` overriding
    (or supplying, when the .star/.cs lacks them) the file's CTF values, as in
    ``distdrgn parse-ctf``. ``allow_nonfinite``: store images with NaN/inf pixels instead of
    refusing them (recorded in the store's attributes; for testing). Returns the store path. Raises DistdrgnError subclasses for bad input.

    While it runs it holds ``OUT.lock`` (:mod:`distdrgn.store.lock`): a second ingest of the
    same output is refused, naming the holder. It refuses to start when the output's file
    system has less free space than the store needs uncompressed; a full disk mid-way
    (ENOSPC, EDQUOT) is a StoreError that keeps the partial store, which a rerun resumes.
    """
    from distdrgn.store.lock import OutputLock

    out = Path(out)
    if dtype not in L.DTYPES:
        raise StoreError(f"{out}: --dtype must be one of {', '.join(L.DTYPES)}, got {dtype!r}")
    if codec not in L.CODECS:
        raise StoreError(f"{out}: unknown codec {codec!r}; choose one of {', '.join(L.CODECS)}")
    _check_output_folder(out)
    # one ingest per output at a time: a second one would race on the partial store's files
    with OutputLock(out):
        try:
            return _ingest(particles, out, poses=poses, ctf=ctf, datadir=datadir, D=D, dtype=dtype, ind=ind,
                           extra_levels=extra_levels, force=force, workers=workers, progress=progress, codec=codec,
                           scheduler=scheduler, layout_overrides=layout_overrides,
                           metadata_options=metadata_options, allow_nonfinite=allow_nonfinite)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # the partial store is kept: the shards already written are reused by a rerun
            raise StoreError(f"{out}: {exc.strerror or 'no space left on device'} while writing "
                             f"{out.name}{L.PARTIAL_SUFFIX}; free some space, then rerun the same command: it "
                             "resumes where it stopped") from None


def estimated_store_bytes(n: int, levels, itemsize: int, has_poses: bool, has_ctf: bool) -> int:
    """Bytes a store of ``n`` images at box sizes ``levels`` takes uncompressed (compression ratio 1):
    every level's images, the original indices, poses (rots + trans) and CTF rows."""
    images = sum(n * d * d * itemsize for d in levels)
    return images + n * (8 + (9 + 2) * 4 * has_poses + 9 * 4 * has_ctf)


def _check_free_space(out: Path, n: int, levels, itemsize: int, has_poses: bool, has_ctf: bool,
                      remaining: float) -> None:
    """StoreError if the file system of ``out`` has less free space than the ``remaining``
    fraction of the store still to write needs (estimated uncompressed: the default codec
    stores raw values, and a compressed one only needs less)."""
    need = int(estimated_store_bytes(n, levels, itemsize, has_poses, has_ctf) * remaining)
    folder = Path(os.path.abspath(out)).parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise StoreError(f"{out}: not enough free disk space: the store needs about {need / 1e9:.2f} GB "
                         f"({n} images at box {', '.join(map(str, levels))}, {itemsize} bytes per pixel, uncompressed) "
                         f"but {folder} has {free / 1e9:.2f} GB free; free some space or choose another output folder")


def _check_output_folder(out: Path) -> None:
    """StoreError (one line) unless ``out``'s folder is, or can be created as, a writable folder;
    then create it (as zarr would), so the lock file can be made beside ``out``."""
    from distdrgn.output_paths import nearest_existing

    parent = Path(os.path.abspath(out)).parent
    existing = nearest_existing(parent)
    if not existing.is_dir():
        raise StoreError(f"{out}: {existing} is a file, not a folder; choose another output path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StoreError(f"{out}: the folder {existing} is not writable; choose another output path")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{out}: cannot create the output folder {parent} ({exc.strerror or exc})") from None


def _ingest(particles, out: Path, *, poses, ctf, datadir, D, dtype, ind, extra_levels, force, workers, progress,
            codec, scheduler, layout_overrides, metadata_options, allow_nonfinite) -> Path:
    """:func:`ingest` once the output's lock is held."""
    from distdrgn.formats.particles import resolve_particles

    partial = out.with_name(out.name + L.PARTIAL_SUFFIX)
    inputs = [p for p in (particles, poses, ctf, ind, datadir) if isinstance(p, (str, os.PathLike))]
    if out.exists() or out.is_symlink():
        if not force:
            raise StoreError(f"{out}: output already exists; use --force to replace it")
        _check_replaceable(out, inputs)

    try:
        # poses/CTF given as pickles replace the file's: do not parse (or require) them there
        source = resolve_particles(particles, datadir=datadir, with_poses=poses is None, with_ctf=ctf is None,
                                   **(metadata_options or {}))
    except OSError as exc:
        raise FormatError(f"{particles}: {exc.strerror or exc}") from None
    inputs += list(source.source_files)
    if out.exists() or out.is_symlink():
        _check_replaceable(out, inputs)
    n_source, source_D = int(source.n), int(source.D)
    if n_source == 0:
        raise FormatError(f"{particles}: no particles")
    if source_D % 2:
        raise FormatError(f"{particles}: box size {source_D} is odd; only even box sizes are supported")
    full_D = source_D if D is None else int(D)
    if full_D <= 0 or full_D % 2 or full_D > source_D:
        raise FormatError(f"{particles}: new box size -D {full_D} must be even, positive and at most the box size {source_D}")
    levels = sorted({full_D, *(int(d) for d in extra_levels)}, reverse=True)
    for d in levels:
        if d <= 0 or d % 2 or d > full_D:
            raise FormatError(f"{particles}: level {d} must be even, positive and at most the stored box size {full_D}")

    if ind is not None:
        original_index, ind_fp = _load_ind(ind, n_source)
    else:
        original_index, ind_fp = np.arange(n_source, dtype=np.int64), None
    n = len(original_index)

    rots = trans = None
    if poses is not None:
        rots, trans = _load_poses(poses, n_source)
    elif source.poses is not None:
        rots, trans = (np.asarray(a, dtype=np.float32) for a in source.poses)
    if rots is not None and trans is None:
        trans = np.zeros((n_source, 2), np.float32)
    ctf_arr = _load_ctf(ctf, n_source) if ctf is not None else source.ctf
    if ctf_arr is not None:
        ctf_arr = np.asarray(ctf_arr, dtype=np.float32)
        if ctf_arr.shape != (n_source, 9):
            raise FormatError(f"{particles}: CTF parameters have shape {ctf_arr.shape}, expected ({n_source}, 9)")

    _check_metadata_against_images(particles, poses, ctf, source, original_index, trans, ctf_arr)

    itemsize = np.dtype(dtype).itemsize
    plan = L.plan_layout(n, full_D, itemsize, levels, **(layout_overrides or {}))
    request = {
        "particles": str(Path(particles).resolve()),
        "datadir": None if datadir is None else str(Path(datadir).resolve()),
        "sources": [file_fingerprint(p) for p in source.source_files],
        "poses": None if poses is None else file_fingerprint(poses),
        "ctf": None if ctf is None else file_fingerprint(ctf),
        "ind": ind_fp,
        "metadata_options": dict(sorted((metadata_options or {}).items())),
        "D": full_D,
        "dtype": dtype,
        "levels": levels,
        "codec": codec,
        "layout": {str(d): p.to_dict() for d, p in plan.items()},
        "format_version": L.FORMAT_VERSION,
        "allow_nonfinite": bool(allow_nonfinite),
    }
    request = json.loads(json.dumps(request))  # normalise (tuples -> lists) for comparison

    fresh_dir = partial.is_dir() and not any(partial.iterdir())  # e.g. pre-created to set Lustre striping
    if partial.exists() and not fresh_dir:
        previous = None
        if _looks_like_store(partial):
            try:
                previous = dict(zarr.open_group(partial, mode="r").attrs).get("ingest_request")
            except Exception:
                previous = None
        if previous != request:
            if not force:
                raise StoreError(
                    f"{partial}: an unfinished ingest with different inputs or options is in the way; "
                    "re-run the original command to resume it, or use --force to discard it"
                )
            _check_replaceable(partial, inputs)
            _remove(partial)

    source_apix = None if source.apix is None else float(source.apix)
    apix = None if source_apix is None else source_apix * source_D / full_D
    n_shards = -(-n // plan[full_D].shard_images)
    done = {s for s in range(n_shards) if _progress_path(partial, s).is_file()} if partial.exists() else set()
    _check_free_space(out, n, levels, itemsize, rots is not None, ctf_arr is not None, 1 - len(done) / n_shards)
    if fresh_dir or not partial.exists():
        from distdrgn.store.source_table import read_source

        source_tables = read_source(particles, getattr(source, "kind", None))
        _create_partial(partial, plan, levels, full_D, n, dtype, codec, request, original_index, rots, trans, ctf_arr,
                        source_tables=source_tables)

    done = {s for s in range(n_shards) if _progress_path(partial, s).is_file()}
    todo = [s for s in range(n_shards) if s not in done]
    job = _Job(
        source=source,
        partial=partial,
        original_index=original_index,
        full_D=full_D,
        source_D=source_D,
        levels=levels,
        plan=plan,
        dtype=dtype,
        sample=sample_positions(n),
        label=str(particles),
        allow_nonfinite=bool(allow_nonfinite),
    )
    workers = workers or L.default_workers(plan, itemsize, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    try:
        _run_tasks(job, todo, workers, scheduler, progress, n_shards)
    except DistdrgnError:
        _remove(partial)  # the input is bad: a resume would fail the same way
        raise

    _finish(partial, plan, levels, full_D, n, n_shards, {
        "n": n,
        "D": full_D,
        "apix": apix,
        "source_D": source_D,
        "source_apix": source_apix,
        "dtype": dtype,
        "codec": codec,
        "kind": getattr(source, "kind", None),
        "has_poses": rots is not None,
        "has_ctf": ctf_arr is not None,
        "allow_nonfinite": bool(allow_nonfinite),
        "provenance": {
            "particles": request["particles"],
            "datadir": request["datadir"],
            "source_files": request["sources"],
            "poses": request["poses"],
            "ctf": request["ctf"],
            "ind": request["ind"],
            "fingerprint": "size + mtime + crc32c of 16 x 4 KiB blocks spread over the file (whole file if <= 1 MiB)",
        },
    })
    if out.exists() or out.is_symlink():  # checked above; again in case it changed during the ingest
        if not force:
            raise StoreError(f"{out}: output appeared during the ingest; use --force to replace it")
        _check_replaceable(out, inputs)
        _remove(out)
    os.replace(partial, out)
    return out


def _create_partial(partial, plan, levels, full_D, n, dtype, codec, request, original_index, rots, trans, ctf_arr,
                    source_tables=None):
    group = zarr.open_group(partial, mode="w-", zarr_format=3)  # "w" would rmtree the dir and lose its striping
    group.attrs.update({"format": L.FORMAT_NAME, "version": L.FORMAT_VERSION, "complete": False, "ingest_request": request})
    itemsize = np.dtype(dtype).itemsize
    for d in levels:
        p = plan[d]
        group.create_array(
            L.images_name(d, full_D),
            shape=(n, d, d),
            chunks=(p.chunk_images, d, d),
            shards=(p.shard_images, d, d),
            dtype=dtype,
            compressors=L.compressors_for(codec, itemsize),
            fill_value=0,
            dimension_names=("particle", "y", "x"),
        )
    rows = min(n, 1 << 18)
    meta = {L.ORIGINAL_INDEX: original_index}
    if rots is not None:
        meta[L.ROTS] = rots[original_index]
        meta[L.TRANS] = trans[original_index]
    if ctf_arr is not None:
        meta[L.CTF] = ctf_arr[original_index]
    crcs = {}
    for name, values in meta.items():
        arr = group.create_array(name, shape=values.shape, chunks=(rows, *values.shape[1:]), dtype=values.dtype,
                                 compressors=None, fill_value=0)
        arr[...] = values
        crcs[name] = f"{crc32c_array(values):08x}"
    group.attrs["metadata_crc32c"] = crcs
    if source_tables is not None:  # every column of the source .star/.cs, for store export
        from distdrgn.store.source_table import write_source

        group.attrs[L.SOURCE_ATTR] = write_source(group, source_tables, original_index)
    (partial / L.PROGRESS_DIR).mkdir(exist_ok=True)


def _finish(partial, plan, levels, full_D, n, n_shards, info):
    records = [json.loads(_progress_path(partial, s).read_text()) for s in range(n_shards)]
    group = zarr.open_group(partial, mode="r+")
    norm = {}
    for d in levels:
        crc = np.array([c for r in records for c in r["levels"][str(d)]["crc32c"]], dtype=np.uint32)
        n_chunks = -(-n // plan[d].chunk_images)
        if len(crc) != n_chunks:
            raise StoreError(f"{partial}: progress records cover {len(crc)} of {n_chunks} chunks at box {d}")
        group.create_array(L.checksum_name(d, full_D), data=crc, chunks=(max(1, len(crc)),), compressors=None,
                           overwrite=True)
        norm[str(d)] = combine([r["levels"][str(d)]["norm_sums"] for r in records])
    nonfinite = sorted(i for r in records for i in r.get("nonfinite", []))
    attrs = dict(group.attrs)
    attrs.update(info)
    if info.get("allow_nonfinite"):
        attrs["nonfinite"] = {"count": len(nonfinite), "positions": nonfinite[:L.MAX_RECORDED_NONFINITE]}
    attrs.update({
        "levels": levels,
        "layout": {str(d): plan[d].to_dict() for d in levels},
        "norm": norm,
        "checksum": {"algorithm": "crc32c", "over": "little-endian values of each chunk of each images array",
                     "arrays": {str(d): L.checksum_name(d, full_D) for d in levels}},
        "created": {
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "distdrgn_version": __version__,
            "zarr_version": zarr.__version__,
            "host": platform.node(),
        },
        "complete": True,
    })
    group.attrs.put(attrs) if hasattr(group.attrs, "put") else group.attrs.update(attrs)
    shutil.rmtree(partial / L.PROGRESS_DIR, ignore_errors=True)
