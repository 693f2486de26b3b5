"""Images/s the training loader sustains from a store on local disk, against the GPU's appetite.

For each box size D and stored dtype a store of random images is built the way a user
would (an .mrcs written through ``MrcStackWriter``, poses/CTF pickles, then
``distdrgn.store.ingest(..., dtype=...)``). Then, for each DataLoader worker count, one
rank's epoch is streamed through the loader path training uses (``GlobalOrder`` ->
``StepSchedule`` -> ``stream_batches(..., num_workers=w)`` with ``Metadata``; world size 1
by default, ``--world-size W`` plays rank ``--rank`` of W) and timed from the call to the
last batch (planning, worker start-up and every batch included). Nothing runs on the
batches: this is the loader alone.

Two page-cache states per worker count:

- ``cold``: every file of the store is flushed (``fsync``) and dropped from the page cache
  with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (no root needed) just before the run; the
  fraction of the store still resident afterwards (``mincore``) is recorded, and the row
  says ``cold (failed)`` when more than half of it stayed cached (e.g. on tmpfs). On a
  virtual machine the host may still cache the disk, so "cold" means cold in this kernel.
- ``warm``: the same epoch again straight after the cold one, which has read what this
  rank needs (the warm-up); when the store is larger than the free memory this is not
  fully warm, and ``resident_before`` in the JSON says how much was cached.

Each row is the fastest of ``--repeat`` epochs (default 3; the median is shown too; a cold
row drops the cache before every epoch). Images/s is the images this rank trained on
divided by the epoch time; MB/s is the bytes read from the store (whole chunks in the
stored dtype, including chunks shared with other ranks) divided by the same time. "others'
CPU" is the share of the machine's CPU time other processes used during that epoch
(/proc/stat minus this process and its workers): on a shared machine, rows with a high
share are lower bounds. The GPU targets (images/s one H100 consumes in training,
issue 5) are 4,100 at D=128 and 900 at D=256; the loader must deliver at least twice that
per rank (column "≥2x target"; "-" for box sizes without a target).

    .venv/bin/python benchmarks/loader_throughput.py [--D 128 256] [--dtype float32 float16]
        [--n N [N ...]] [--workers 0 1 2 4] [--cache cold warm] [--repeat 3] [--batch-size 64] [--world-size 1]
        [--rank 0] [--window 4] [--verify-chunks on off] [--root DIR] [--keep]
        [--json benchmarks/loader_throughput.json]

``--verify-chunks``: ``on`` (the default, what training does) checks every chunk's crc32c as it
is read; ``off`` reads unchecked (``data.allow_unverified=true``); ``on off`` measures both
(column "checksums").

Default sizes: 20,000 images at D=128 and 6,000 at D=256 (1.3 and 1.6 GB in float32);
other D get about as many bytes. Stores are built in a temporary directory under ``--root``
(default: the system temp dir) and deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run as a file from the repo root: make the package importable
    sys.path.insert(0, str(REPO))
from benchmarks._common import cpu_model, write_random_particles  # noqa: E402

MB = 1e6
# images/s one H100 consumes while training (issue 5); the loader must sustain twice this
GPU_TARGET_IMAGES_PER_S = {128: 4100, 256: 900}
LOADER_FACTOR = 2.0
DEFAULT_N = {128: 20_000, 256: 6_000}
COLD_FAILED_RESIDENT = 0.5  # more of the store than this still cached after the drop: not cold


def default_n(D: int) -> int:
    """Images per store: the issue's sizes at D=128/256, else about the bytes of 20,000 at 128."""
    return DEFAULT_N.get(D, max(512, int(20_000 * (128 / D) ** 2)))


# ---- machine -------------------------------------------------------------------------------


def memory_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def filesystem_of(path: Path) -> dict:
    """Device, filesystem type and size of the filesystem holding ``path`` (``df -T``)."""
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, check=True).stdout
        fields = out.strip().splitlines()[-1].split()
        return {"device": fields[0], "type": fields[1], "size_gb": round(int(fields[2]) / 1024**2, 1),
                "mounted_on": fields[-1], "df": out.strip()}
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError) as exc:
        return {"error": str(exc)}


def machine_info(root: Path) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu_model(),
        "cores": cores,
        "memory_gb": memory_total_gb(),
        "gpu": gpu,
        "root": str(root),
        "filesystem": filesystem_of(root),
        "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": "python benchmarks/loader_throughput.py " + " ".join(sys.argv[1:]),
    }


# ---- page cache ----------------------------------------------------------------------------
def store_files(store: Path) -> list[Path]:
    return sorted(p for p in Path(store).rglob("*") if p.is_file())


def drop_page_cache(store: Path) -> None:
    """Flush and evict every file of ``store`` from the page cache (no root needed)."""
    for path in store_files(store):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc = None


def _mincore_lib():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        _libc = lib
    return _libc


def resident_fraction(store: Path) -> float | None:
    """Fraction of the store's bytes (page-rounded) held in the page cache, by ``mincore``;
    None where that cannot be asked (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    lib = _mincore_lib()
    page = os.sysconf("SC_PAGE_SIZE")
    resident = total = 0
    for path in store_files(store):
        size = path.stat().st_size
        if size == 0:
            continue
        n_pages = -(-size // page)
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = lib.mmap(None, size, 0x1, 0x01, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = ctypes.create_string_buffer(n_pages)
                if lib.mincore(addr, size, vec) != 0:
                    return None
                resident += sum(b & 1 for b in vec.raw)
            finally:
                lib.munmap(addr, size)
        finally:
            os.close(fd)
        total += n_pages
    return resident / total if total else None


# ---- store ---------------------------------------------------------------------------------
def build_store(root: Path, n: int, D: int, dtype: str, seed: int = 0) -> Path:
    """Random images -> .mrcs (``MrcStackWriter``) + poses.pkl + ctf.pkl -> ``ingest(dtype=...)``."""
    from distdrgn.store import ingest

    files = write_random_particles(root, n, D, seed)
    store = ingest(files["mrcs"], root / f"particles_D{D}_{dtype}.zarr", poses=files["poses"], ctf=files["ctf"],
                   dtype=dtype, progress=False)
    files["mrcs"].unlink()  # the store is all the loader reads; halve the disk used
    return Path(store)


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in store_files(path))


# ---- measurement ---------------------------------------------------------------------------
def _machine_busy() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot (/proc/stat; (0, 0) elsewhere)."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0, 0
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return sum(ticks[:8]) - idle, sum(ticks[:8])


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system  # workers count once joined


def time_epoch(store_path: Path, *, world_size: int, rank: int, batch_size: int, num_workers: int, window: int,
               seed: int = 0, epoch: int = 0, verify_chunks: bool = True) -> dict:
    """Stream rank ``rank``'s batches of one epoch through the training loader; time it.

    Also returns ``others_cpu``: the fraction of the machine's CPU time during the epoch
    used by processes other than this one and its workers (a shared machine's noise).
    """
    import torch

    from distdrgn.loader import GlobalOrder, Metadata, StepSchedule, stream_batches
    from distdrgn.store import ParticleStore

    busy0, total0 = _machine_busy()
    own0 = _own_cpu_seconds()
    t0 = time.perf_counter()
    store = ParticleStore.open(store_path, verify_chunks=verify_chunks)
    meta = Metadata.from_store(store)
    order = GlobalOrder([store.chunk_range(c) for c in range(store.n_chunks)], seed=seed, epoch=epoch,
                        window_chunks=window)
    schedule = StepSchedule(store.n, 0, world_size, batch_size)
    stats: dict = {}
    images = steps = 0
    first_batch = None
    checksum = 0.0
    for batch in stream_batches(str(store.path), store.D, order, schedule, rank, meta, num_workers=num_workers,
                                pin_memory=torch.cuda.is_available(), stats=stats, verify_chunks=verify_chunks):
        if first_batch is None:
            first_batch = time.perf_counter() - t0
        images += len(batch.indices)
        steps += 1
        if len(batch.indices):
            checksum += float(batch.images[0, 0, 0])  # touch the batch so nothing is optimised away
    seconds = time.perf_counter() - t0
    own = _own_cpu_seconds() - own0
    busy1, total1 = _machine_busy()
    others = None
    if total1 > total0:
        tick = os.sysconf("SC_CLK_TCK")
        others = max(0.0, ((busy1 - busy0) / tick - own) / ((total1 - total0) / tick))
    bytes_read = stats["images_read"] * store.D * store.D * store.dtype.itemsize
    return {
        "images": images, "steps": steps, "seconds": round(seconds, 3), "first_batch_s": round(first_batch or 0.0, 3),
        "images_per_s": round(images / seconds, 1), "mb_per_s": round(bytes_read / MB / seconds, 1),
        "chunks_read": stats["chunks_read"], "images_read": stats["images_read"],
        "max_held_images": stats["max_held_images"], "cpu_s": round(own, 2),
        "others_cpu": None if others is None else round(others, 3), "checksum": checksum,
    }


def measure_store(store: Path, D: int, dtype: str, args, worker_counts: list[int]) -> list[dict]:
    """One row per (worker count, cache state): the best of ``args.repeat`` epochs (and all of them)."""
    from distdrgn.store import ParticleStore

    st = ParticleStore.open(store)
    base = {"D": D, "dtype": dtype, "n": st.n, "chunk_images": st.chunk_images, "n_chunks": st.n_chunks,
            "store_mb": round(directory_bytes(store) / MB, 1), "world_size": args.world_size, "rank": args.rank,
            "batch_size": args.batch_size, "window_chunks": args.window, "repeat": args.repeat}
    target = GPU_TARGET_IMAGES_PER_S.get(D)
    epoch_args = {"world_size": args.world_size, "rank": args.rank, "batch_size": args.batch_size,
                  "window": args.window}
    rows = []
    can_drop = hasattr(os, "posix_fadvise")
    states = [c for c in ("cold", "warm") if c in args.cache]  # a cold run is the warm run's warm-up
    for w, verify in ((w, v) for w in worker_counts for v in args.verify_chunks):
        epoch_args["verify_chunks"] = verify == "on"
        for cache in states:
            row = {**base, "workers": w, "cache": cache, "verify_chunks": verify == "on", "gpu_target_images_per_s": target,
                   "required_images_per_s": None if target is None else LOADER_FACTOR * target}
            if cache == "cold" and not can_drop:
                rows.append({**row, "skipped": "os.posix_fadvise is not available on this platform"})
                continue
            if cache == "warm" and "cold" not in states:
                time_epoch(store, num_workers=w, **epoch_args)  # the warm-up run
            runs, resident = [], []
            for _ in range(args.repeat):
                if cache == "cold":
                    drop_page_cache(store)
                resident.append(resident_fraction(store))
                runs.append(time_epoch(store, num_workers=w, **epoch_args))
            if cache == "cold" and any(f is not None and f > COLD_FAILED_RESIDENT for f in resident):
                row["cache"] = "cold (failed)"
            best = max(runs, key=lambda r: r["images_per_s"])
            row.update(best)
            row["resident_before"] = resident[runs.index(best)]
            rates = [r["images_per_s"] for r in runs]
            row["images_per_s_median"] = round(float(np.median(rates)), 1)
            row["images_per_s_all"] = rates
            row["others_cpu_all"] = [r["others_cpu"] for r in runs]
            row["meets_2x_target"] = None if target is None else bool(best["images_per_s"] >= LOADER_FACTOR * target)
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("D", "dtype", "workers", "cache", "verify_chunks", "images_per_s_all", "mb_per_s",
                                                  "others_cpu_all")}), flush=True)
    return rows


# ---- report --------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    lines = [("| D | dtype | N | workers | checksums | page cache | images/s (best) | images/s (median) | MB/s read "
              "| epoch (s) | others' CPU | GPU target (img/s) | ≥2x target |"),
             "| ---: | --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        target = "-" if r["gpu_target_images_per_s"] is None else f"{r['gpu_target_images_per_s']:,}"
        checked = "checked" if r.get("verify_chunks", True) else "unchecked"
        if "skipped" in r:
            lines.append(f"| {r['D']} | {r['dtype']} | {r['n']:,} | {r['workers']} | {checked} | {r['cache']} | - | - | - "
                         f"| - | - | {target} | skipped: {r['skipped']} |")
            continue
        ok = "-" if r["meets_2x_target"] is None else ("pass" if r["meets_2x_target"] else "fail")
        others = "-" if r["others_cpu"] is None else f"{100 * r['others_cpu']:.0f}%"
        lines.append(f"| {r['D']} | {r['dtype']} | {r['n']:,} | {r['workers']} | {checked} | {r['cache']} "
                     f"| {r['images_per_s']:,.0f} | {r['images_per_s_median']:,.0f} | {r['mb_per_s']:,.0f} "
                     f"| {r['seconds']:.2f} | {others} | {target} | {ok} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--D", type=int, nargs="+", default=[128, 256], help="box sizes (even)")
    ap.add_argument("--dtype", nargs="+", choices=("float32", "float16"), default=["float32", "float16"],
                    help="stored image dtype (ingest --dtype)")
    ap.add_argument("--n", type=int, nargs="+",
                    help="images per store: one value for every D, or one per --D value "
                         "(default: 20,000 at D=128, 6,000 at D=256)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4],
                    help="DataLoader worker counts (train.num_workers); capped to the CPU count")
    ap.add_argument("--cache", nargs="+", choices=("cold", "warm"), default=["cold", "warm"])
    ap.add_argument("--repeat", type=int, default=3, help="epochs timed per row; the row shows the fastest")
    ap.add_argument("--batch-size", type=int, default=64, help="images per rank per step")
    ap.add_argument("--world-size", type=int, default=1, help="play one rank of this many")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--window", type=int, default=4, help="train.shuffle_chunks")
    ap.add_argument("--verify-chunks", nargs="+", choices=("on", "off"), default=["on"],
                    help="check each chunk's crc32c as it is read (on, what training does) or not (off: "
                         "data.allow_unverified=true); 'on off' measures both")
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()), help="where the stores are built")
    ap.add_argument("--keep", action="store_true", help="keep the stores (printed) instead of deleting them")
    ap.add_argument("--json", type=Path, default=HERE / "loader_throughput.json")
    args = ap.parse_args(argv)
    if any(d <= 0 or d % 2 for d in args.D):
        ap.error("--D: box sizes must be even and positive")
    if args.n is not None:
        if any(n < 1 for n in args.n):
            ap.error("--n must be >= 1")
        if len(args.n) not in (1, len(args.D)):
            ap.error(f"--n: give one value, or one per --D value ({len(args.D)})")
    args.n_per_D = {D: default_n(D) if args.n is None else args.n[0 if len(args.n) == 1 else i]
                    for i, D in enumerate(args.D)}
    if not 0 <= args.rank < args.world_size:
        ap.error("--rank must be in [0, --world-size)")
    if args.batch_size < 1 or args.window < 1 or args.repeat < 1 or any(w < 0 for w in args.workers):
        ap.error("--batch-size, --window and --repeat must be >= 1, --workers >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cpus = os.cpu_count() or 1
    worker_counts = sorted({min(w, cpus) for w in args.workers})
    capped = [w for w in args.workers if w > cpus]
    args.root.mkdir(parents=True, exist_ok=True)
    meta = machine_info(args.root)
    if capped:
        meta["workers_capped"] = f"{capped} capped to the {cpus} CPUs"
    work = Path(tempfile.mkdtemp(prefix="loader_throughput_", dir=args.root))
    rows: list[dict] = []
    try:
        for D in args.D:
            for dtype in args.dtype:
                n = args.n_per_D[D]
                t0 = time.perf_counter()
                store = build_store(work / f"D{D}_{dtype}", n, D, dtype)
                build_s = time.perf_counter() - t0
                print(f"built {store} ({n} images, {build_s:.1f} s)", flush=True)
                for r in measure_store(store, D, dtype, args, worker_counts):
                    r["build_seconds"] = round(build_s, 1)
                    rows.append(r)
    finally:
        if args.keep:
            print(f"stores kept under {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"loader only: rank {args.rank} of {args.world_size}, batch {args.batch_size}/rank, shuffle window "
          f"{args.window} chunks; {meta['cpu']}, {meta['cores']} cores; store on "
          f"{meta['filesystem'].get('type', '?')} ({meta['filesystem'].get('device', '?')})")
    print(table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    saved_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "n_per_D"}
    saved_args["n_per_D"] = {str(D): n for D, n in args.n_per_D.items()}
    args.json.write_text(json.dumps({"meta": meta, "args": saved_args, "results": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
