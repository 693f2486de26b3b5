"""Measure store layouts on simulated noisy particles: bytes on disk, write and read MB/s.

Particles are smooth random blobs (a stand-in for projections) plus Gaussian noise at
SNR ~0.1, like real cryo-EM images. For each configuration (chunk size, shard size, codec,
dtype) the images are written into a sharded Zarr v3 array one shard at a time, then read
back chunk by chunk (sequential and shuffled chunk order, page cache dropped where allowed
is NOT attempted: numbers are warm-cache, i.e. codec + zarr overhead). Then the full ingest
is timed with dask threads vs processes.

    .venv/bin/python benchmarks/store_layout.py [--n 1024] [--D 128] [--json out.json]

Prints one table and writes the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from distdrgn.store import layout as L

MiB = 1 << 20


def simulate_particles(n: int, D: int, snr: float = 0.1, seed: int = 0) -> np.ndarray:
    """(n, D, D) float32: a few Gaussian blobs per image plus white noise at the given SNR."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:D, 0:D].astype(np.float32) - D / 2
    out = np.empty((n, D, D), np.float32)
    for i in range(n):
        signal = np.zeros((D, D), np.float32)
        for _ in range(6):
            cx, cy = rng.normal(0, D / 10, 2)
            w = rng.uniform(D / 20, D / 8)
            signal += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * w * w))
        signal /= signal.std() + 1e-12
        out[i] = signal + rng.standard_normal((D, D), dtype=np.float32) / np.sqrt(snr)
    return out


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(data: np.ndarray, root: Path, chunk_mib: float, shard_mib: float, codec: str, dtype: str) -> dict:
    n, D, _ = data.shape
    itemsize = np.dtype(dtype).itemsize
    chunk = max(1, int(chunk_mib * MiB) // (D * D * itemsize))
    shard = chunk * max(1, int(shard_mib * MiB) // (chunk * D * D * itemsize))
    path = root / f"c{chunk_mib}_s{shard_mib}_{codec}_{dtype}.zarr"
    arr = zarr.create_array(path, shape=data.shape, chunks=(chunk, D, D), shards=(shard, D, D), dtype=dtype,
                            compressors=L.compressors_for(codec, itemsize), fill_value=0)
    values = data.astype(dtype)
    t0 = time.perf_counter()
    for s in range(0, n, shard):
        arr[s : s + shard] = values[s : s + shard]
    write_s = time.perf_counter() - t0
    logical = values.nbytes
    n_chunks = -(-n // chunk)
    reader = zarr.open_array(path, mode="r")
    t0 = time.perf_counter()
    for c in range(n_chunks):
        reader[c * chunk : (c + 1) * chunk]
    read_s = time.perf_counter() - t0
    order = np.random.default_rng(1).permutation(n_chunks)
    t0 = time.perf_counter()
    for c in order:
        reader[c * chunk : (c + 1) * chunk]
    rand_s = time.perf_counter() - t0
    size = du(path)
    shutil.rmtree(path)
    return {
        "chunk_MiB": chunk_mib, "chunk_images": chunk, "shard_MiB": shard_mib, "shard_images": shard, "codec": codec,
        "dtype": dtype, "bytes": size, "ratio": size / logical, "write_MBps": logical / MiB / write_s,
        "read_MBps": logical / MiB / read_s, "random_read_MBps": logical / MiB / rand_s,
    }


def measure_ingest(data: np.ndarray, root: Path, scheduler: str, workers: int) -> dict:
    import mrcfile

    from distdrgn.store.writer import ingest

    stack = root / "bench.mrcs"
    if not stack.exists():
        with mrcfile.new(stack) as m:
            m.set_data(data)
    out = root / f"ingest_{scheduler}.zarr"
    t0 = time.perf_counter()
    ingest(stack, out, workers=workers, progress=False, scheduler=scheduler, force=True)
    secs = time.perf_counter() - t0
    shutil.rmtree(out)
    return {"scheduler": scheduler, "workers": workers, "seconds": secs, "MBps": data.nbytes / MiB / secs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--D", type=int, default=128)
    parser.add_argument("--workers", type=int, default=min(4, len(os.sched_getaffinity(0))))
    parser.add_argument("--json", default="store_layout.json")
    parser.add_argument("--dir", help="scratch directory (default: a temporary one under /tmp)")
    args = parser.parse_args()

    data = simulate_particles(args.n, args.D)
    configs = [(c, 64, "none", "float32") for c in (1, 4, 16)]
    configs += [(4, s, "none", "float32") for s in (16,)]
    configs += [(4, 64, codec, "float32") for codec in L.CODECS if codec != "none"]
    configs += [(4, 64, "none", "float16"), (4, 64, "blosc-zstd-bitshuffle", "float16")]
    root = Path(tempfile.mkdtemp(prefix="store_layout_", dir=args.dir))
    try:
        rows = [measure(data, root, *cfg) for cfg in configs]
        ingest_rows = [measure_ingest(data, root, sched, args.workers) for sched in ("threads", "processes")]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"{args.n} simulated particles of {args.D} px ({data.nbytes / MiB:.0f} MiB float32), warm cache")
    header = f"{'chunk':>6} {'shard':>6} {'codec':<22} {'dtype':<8} {'ratio':>6} {'write MB/s':>10} {'read MB/s':>10} {'rand MB/s':>10}"
    print(header)
    for r in rows:
        print(f"{r['chunk_MiB']:>5}M {r['shard_MiB']:>5}M {r['codec']:<22} {r['dtype']:<8} {r['ratio']:>6.3f} "
              f"{r['write_MBps']:>10.0f} {r['read_MBps']:>10.0f} {r['random_read_MBps']:>10.0f}")
    for r in ingest_rows:
        print(f"ingest ({r['scheduler']}, {r['workers']} workers): {r['seconds']:.2f} s, {r['MBps']:.0f} MB/s")
    Path(args.json).write_text(json.dumps({"n": args.n, "D": args.D, "layouts": rows, "ingest": ingest_rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
