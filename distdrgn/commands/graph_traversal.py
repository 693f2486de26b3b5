"""``distdrgn graph-traversal Z.pkl --anchors I J ... -o OUTDIR``: a path along the data in latent space."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("latents", metavar="Z.pkl|RUN_DIR", help="latent file (z.pkl) or training run directory")
    parser.add_argument("--anchors", type=int, nargs="+", required=True, metavar="I",
                        help="0-based particle indices the path visits in order (at least 2)")
    parser.add_argument("-o", "--outdir", required=True, help="output directory for path.txt and z.path.txt")
    parser.add_argument("--epoch", type=int, default=None, help="epoch of z.EPOCH.pkl when given a run directory")
    parser.add_argument("--max-neighbors", type=int, default=10, help="neighbours per particle in the kNN graph (default 10)")
    parser.add_argument("--avg-neighbors", type=float, default=5.0,
                        help="edges longer than the distance that keeps this many neighbours per particle on "
                        "average are removed (default 5)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="explicit maximum edge length (overrides --avg-neighbors)")
    parser.add_argument("--backend", default="auto",
                        choices=["auto", "faiss-gpu", "torch-cuda", "kdtree", "faiss-flat", "faiss-ivf"],
                        help="kNN search (default auto: GPU when available, else an exact kd-tree)")
    parser.add_argument("--nprobe", type=int, default=16, help="lists searched by the approximate faiss-ivf backend")


def main(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from distdrgn.analysis.graph import graph_traversal
    from distdrgn.analysis.inputs import load_latent_source, save_latents_txt

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("distdrgn").setLevel(logging.INFO)
    src = load_latent_source(args.latents, args.epoch)
    t0 = time.time()
    result = graph_traversal(src.z, args.anchors, max_neighbors=args.max_neighbors, avg_neighbors=args.avg_neighbors,
                             threshold=args.threshold, backend=args.backend, nprobe=args.nprobe)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    np.savetxt(out / "path.txt", result.path, fmt="%d")
    save_latents_txt(out / "z.path.txt", src.z[result.path])
    for a, b, length, hops in result.segments:
        print(f"{a} -> {b}: length {length:.4g}, {hops} hops (straight line {np.linalg.norm(src.z[b] - src.z[a]):.4g})")
    print(f"path: {len(result.path)} particles, {result.hops} hops, length {result.length:.4g} "
          f"(graph: {len(src.z)} latents, {result.n_edges} edges at threshold {result.threshold:.4g}, "
          f"kNN {result.backend}, {time.time() - t0:.1f} s)")
    print(f"wrote {out / 'path.txt'} and {out / 'z.path.txt'}")
    return 0
