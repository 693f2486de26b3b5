"""kNN graph throughput of each backend of ``distdrgn.analysis.graph.knn`` on synthetic latents.

For each N (default 100k and 1M) and backend, ``knn(z, k)`` is called once on the same
latents and timed (index build + all N queries; the latents are made beforehand). The
latents are those of ``benchmarks/analysis.py``: 5 well-separated noisy ring-shaped bands
embedded in zdim dimensions, a low-dimensional manifold as trained latents are.

Reported per row: seconds, points/s (N / seconds) and recall@k against the exact answer,
on a random subsample of ``--recall-queries`` points (default 2,000): the exact
neighbours of those points are found with a kd-tree over all N (cheap: only those queries),
and recall is the fraction of them in the backend's list (1.0 for the exact backends,
up to ties; below 1 for the approximate ``faiss-ivf``).

Backends: ``kdtree`` (scipy cKDTree, all cores), ``faiss-flat`` (exact IndexFlatL2,
O(N^2); skipped above ``--flat-max`` points), ``faiss-ivf`` (approximate IndexIVFFlat,
``--nprobe``), ``faiss-gpu`` and ``torch-cuda`` (need a GPU). A backend that cannot run
here (no faiss, no GPU) is listed with the reason.

    .venv/bin/python benchmarks/knn.py [--n 100000 1000000] [--zdim 8] [--k 10]
        [--backends kdtree faiss-flat faiss-ivf faiss-gpu torch-cuda] [--flat-max 200000]
        [--nprobe 16] [--recall-queries 2000] [--json benchmarks/knn.json]

Prints one table and writes JSON (machine, date, command, one record per row).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run as a file from the repo root: make the package importable
    sys.path.insert(0, str(REPO))
from benchmarks._common import cpu_model  # noqa: E402

BACKENDS = ("kdtree", "faiss-flat", "faiss-ivf", "faiss-gpu", "torch-cuda")
APPROXIMATE = ("faiss-ivf",)


def _load_analysis_benchmark():
    """benchmarks/analysis.py as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("distdrgn_benchmarks_analysis", HERE / "analysis.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_latents(n: int, zdim: int, seed: int = 0) -> np.ndarray:
    """(n, zdim) float32 latents on 5 noisy bands (benchmarks/analysis.py's generator)."""
    return _load_analysis_benchmark().synthetic_latents(n, zdim, seed)[0]


def exact_neighbours(z: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """(q, k) indices of the k nearest other points of ``z[queries]`` among all of z (kd-tree)."""
    from scipy.spatial import cKDTree

    _, idx = cKDTree(z).query(z[queries], k=k + 1, workers=-1)
    out = np.empty((len(queries), k), dtype=np.int64)
    for row, (q, found) in enumerate(zip(queries, idx)):
        others = found[found != q]  # the point itself, wherever a duplicate put it
        out[row] = others[:k]
    return out


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / k; found, exact: (q, k) neighbour indices."""
    k = exact.shape[1]
    hits = sum(len(np.intersect1d(f, e, assume_unique=False)) for f, e in zip(found, exact))
    return hits / (k * len(exact))


def skip_reason(backend: str, n: int, flat_max: int) -> str | None:
    """Why ``backend`` is not run at ``n`` here, or None."""
    if backend.startswith("faiss"):
        try:
            import faiss
        except ImportError:
            return "faiss is not installed"
    if backend == "faiss-flat" and n > flat_max:
        return f"exact flat scan is O(N^2) on the CPU; N > --flat-max {flat_max:,}"
    if backend == "faiss-gpu":
        import faiss

        if not (getattr(faiss, "get_num_gpus", None) and faiss.get_num_gpus() > 0):
            return "faiss has no GPU (CPU build or no visible GPU)"
    if backend == "torch-cuda":
        try:
            import torch
        except ImportError:
            return "torch is not installed"
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
    return None


def run_backend(z: np.ndarray, k: int, backend: str, nprobe: int, queries: np.ndarray, exact: np.ndarray) -> dict:
    from distdrgn.analysis.graph import knn

    t0 = time.perf_counter()
    _dist, idx, used = knn(z, k, backend=backend, nprobe=nprobe)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 3), "points_per_s": round(len(z) / seconds, 1),
            f"recall_at_{k}": round(recall_at_k(idx[queries], exact), 4), "backend_used": used}




def machine_info() -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(), "cores": cores,
            "gpu": None, "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "python": platform.python_version(), "command": "python benchmarks/knn.py " + " ".join(sys.argv[1:])}
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        info["faiss"] = None
    import scipy

    info["scipy"] = scipy.__version__
    if os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0"):
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def table(rows: list[dict], k: int) -> str:
    key = f"recall_at_{k}"
    lines = [f"| backend | N | zdim | time (s) | points/s | recall@{k} | notes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['backend']} | {r['n']:,} | {r['zdim']} | - | - | - | "
                         f"{'skipped: ' + r['skipped'] if 'skipped' in r else 'failed: ' + r['error']} |")
            continue
        note = "approximate" + (f", nprobe {r['nprobe']}" if r["backend"] == "faiss-ivf" else "") \
            if r["backend"] in APPROXIMATE else "exact"
        lines.append(f"| {r['backend']} | {r['n']:,} | {r['zdim']} | {r['seconds']:.2f} | {r['points_per_s']:,.0f} "
                     f"| {r[key]:.4f} | {note} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000], help="numbers of latents")
    ap.add_argument("--zdim", type=int, default=8)
    ap.add_argument("--k", type=int, default=10, help="neighbours per point")
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    ap.add_argument("--flat-max", type=int, default=200_000, help="largest N for faiss-flat (O(N^2) on the CPU)")
    ap.add_argument("--nprobe", type=int, default=16, help="faiss-ivf lists searched per query")
    ap.add_argument("--recall-queries", type=int, default=2000, help="random points recall is measured on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=HERE / "knn.json")
    args = ap.parse_args(argv)
    if any(n <= args.k for n in args.n):
        ap.error("--n: each N must be larger than --k")
    if args.zdim < 1 or args.k < 1 or args.recall_queries < 1:
        ap.error("--zdim, --k and --recall-queries must be >= 1")
    return args


def main(argv=None) -> int:
    from distdrgn.errors import DistdrgnError

    args = parse_args(argv)
    meta = machine_info()
    rows: list[dict] = []
    for n in args.n:
        z = synthetic_latents(n, args.zdim, args.seed)
        rng = np.random.default_rng(args.seed + 1)
        queries = np.sort(rng.choice(n, min(args.recall_queries, n), replace=False))
        exact = exact_neighbours(z, queries, args.k)
        for backend in args.backends:
            row = {"backend": backend, "n": n, "zdim": args.zdim, "k": args.k, "nprobe": args.nprobe,
                   "recall_queries": len(queries)}
            reason = skip_reason(backend, n, args.flat_max)
            if reason:
                row["skipped"] = reason
            else:
                try:
                    row.update(run_backend(z, args.k, backend, args.nprobe, queries, exact))
                except (DistdrgnError, ImportError, MemoryError, RuntimeError) as exc:  # keep the other rows
                    row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"k = {args.k}; {meta['cpu']}, {meta['cores']} cores" + (f", {meta['gpu']}" if meta["gpu"] else ", no GPU"))
    print(table(rows, args.k))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    saved_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.json.write_text(json.dumps({"meta": meta, "args": saved_args, "results": rows}, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
