"""Per-rank memory of the training loader at 10k and 1M particles: it must not grow with N.

For each N a store of random D x D float32 images is built the way a user would: an .mrcs
written through a memory map (``MrcStackWriter``), poses/CTF pickles, then
``distdrgn.store.ingest``. A fresh process per N then plays one rank of a W-process run
with the real loader (``GlobalOrder`` -> ``StepSchedule`` -> ``stream_batches`` with
DataLoader workers, and ``Metadata``) for ``--steps`` steps and reports:

- RSS after imports + opening the store, after loading the per-particle metadata, and the
  peak while streaming (VmHWM), for the main process and the largest worker;
- the most images the loader held at once, chunks/images read (read amplification =
  images read / images trained on by this rank).

    .venv/bin/python benchmarks/loader_memory.py [--sizes 10000 1000000] [--D 32] [--steps 2000]
        [--world-size 2] [--batch-size 16] [--num-workers 2] [--root /tmp] [--json benchmarks/loader_memory.json]

Stores are built under ``--root`` and deleted afterwards (1M x 32 x 32 float32 is 4 GB, twice:
the .mrcs and the store). Prints one table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from the repo root
    sys.path.insert(0, str(REPO))

from benchmarks._common import write_random_particles  # noqa: E402

MiB = 1 << 20


def rss_now() -> int:
    """Current resident set size of this process in bytes (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def peak_rss(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM) in bytes. Unlike ``ru_maxrss`` it is not inherited
    across exec from the parent (which built the stores)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def children() -> list[int]:
    pid = os.getpid()
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(p) for p in fh.read().split()]


def build_store(root: Path, n: int, D: int) -> Path:
    """Random images -> .mrcs (through np.memmap) + poses.pkl + ctf.pkl -> ingest."""
    from distdrgn.store import ingest

    files = write_random_particles(root, n, D)
    store = ingest(files["mrcs"], root / "particles.zarr", poses=files["poses"], ctf=files["ctf"], progress=False)
    files["mrcs"].unlink()
    return Path(store)


def measure_rank(store_path: str, world_size: int, batch_size: int, steps: int, num_workers: int, window: int) -> dict:
    """Stream ``steps`` steps of rank 0's batches (run in a fresh process)."""
    import torch  # noqa: F401  (counted in the baseline, as in training)

    from distdrgn.loader import GlobalOrder, Metadata, StepSchedule, stream_batches
    from distdrgn.store import ParticleStore

    store = ParticleStore.open(store_path)
    base = rss_now()
    meta = Metadata.from_store(store)
    after_meta = rss_now()
    chunks = [store.chunk_range(c) for c in range(store.n_chunks)]
    order = GlobalOrder(chunks, seed=0, epoch=0, window_chunks=window)
    schedule = StepSchedule(store.n, 0, world_size, batch_size)
    n_steps = min(steps, schedule.n_steps)
    # a schedule ending after n_steps: the same steps, and stream_batches plans only those
    short = StepSchedule(min(store.n, n_steps * world_size * batch_size), 0, world_size, batch_size)
    stats: dict = {}
    t0 = time.perf_counter()
    images = 0
    worker_peak = 0
    for step, batch in enumerate(stream_batches(store_path, None, order, short, 0, meta, num_workers=num_workers,
                                                stats=stats)):
        images += len(batch.indices)
        if step % 50 == 0 or step == n_steps - 1:  # the workers exit with the iterator: sample them while alive
            worker_peak = max([worker_peak] + [peak_rss(p) for p in children()])
    seconds = time.perf_counter() - t0
    return {
        "n": store.n, "D": store.D, "chunk_images": store.chunk_images, "n_chunks": store.n_chunks,
        "steps": n_steps, "images_trained": images, "seconds": round(seconds, 2),
        "rss_base_mib": base / MiB, "rss_after_metadata_mib": after_meta / MiB,
        "peak_rss_mib": peak_rss() / MiB,
        "peak_worker_rss_mib": worker_peak / MiB,
        "max_held_images": stats["max_held_images"], "chunks_read": stats["chunks_read"],
        "images_read": stats["images_read"], "read_amplification": stats["images_read"] / max(images, 1),
        "metadata_bytes_per_particle": (meta.rots.nbytes + (meta.trans.nbytes if meta.trans is not None else 0)
                                        + (meta.ctf.nbytes if meta.ctf is not None else 0)) / store.n,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--D", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--window", type=int, default=4, help="train.shuffle_chunks")
    ap.add_argument("--root", default=tempfile.gettempdir())
    ap.add_argument("--json", default=str(Path(__file__).with_suffix(".json")))
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure this store in this process
    args = ap.parse_args(argv)

    if args.measure:
        print(json.dumps(measure_rank(args.measure, args.world_size, args.batch_size, args.steps, args.num_workers,
                                      args.window)))
        return 0

    results = []
    for n in args.sizes:
        root = Path(tempfile.mkdtemp(prefix=f"loader_memory_{n}_", dir=args.root))
        try:
            t0 = time.perf_counter()
            store = build_store(root, n, args.D)
            build_s = time.perf_counter() - t0
            cmd = [sys.executable, __file__, "--measure", str(store), "--world-size", str(args.world_size),
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                   "--num-workers", str(args.num_workers), "--window", str(args.window)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            res["build_seconds"] = round(build_s, 1)
            results.append(res)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    print(f"rank 0 of {args.world_size}, batch {args.batch_size}/rank, {args.num_workers} workers, "
          f"shuffle window {args.window} chunks")
    head = ["N", "chunk", "steps", "base MiB", "+metadata MiB", "peak MiB", "worker peak MiB", "held imgs",
            "read ampl."]
    print(" | ".join(f"{h:>15}" for h in head))
    for r in results:
        row = [r["n"], r["chunk_images"], r["steps"], f"{r['rss_base_mib']:.0f}", f"{r['rss_after_metadata_mib']:.0f}",
               f"{r['peak_rss_mib']:.0f}", f"{r['peak_worker_rss_mib']:.0f}", r["max_held_images"],
               f"{r['read_amplification']:.2f}"]
        print(" | ".join(f"{v!s:>15}" for v in row))
    Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "measure"},
                                           "results": results}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
