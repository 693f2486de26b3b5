"""``distdrgn analyze RUN_DIR``: PCA, k-means, UMAP, representative volumes and an HTML report."""

from __future__ import annotations

import argparse
import logging


def epoch_argument(args) -> int | None:
    """EPOCH given positionally (cryoDRGN's habit) or as --epoch; both only if they agree."""
    from distdrgn.errors import DistdrgnError

    if args.epoch_pos is not None and args.epoch is not None and args.epoch_pos != args.epoch:
        raise DistdrgnError(f"epoch given twice: {args.epoch_pos} and --epoch {args.epoch}")
    return args.epoch if args.epoch is not None else args.epoch_pos


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="training run directory (config.yaml, weights*.pkl, z*.pkl)")
    parser.add_argument("epoch_pos", metavar="EPOCH", nargs="?", type=int, default=None,
                        help="as cryoDRGN's `analyze RUN EPOCH`: the same as --epoch EPOCH")
    parser.add_argument(
        "--epoch",
        type=int,
        default=None,
        help="epoch of z.N.pkl / weights.N.pkl to analyze, numbered from 1 as cryoDRGN numbers them; negative "
        "counts from the last saved epoch (default: the final z.pkl / weights.pkl)",
    )
    parser.add_argument("--ksample", type=int, default=20, help="number of k-means clusters / volumes (default 20)")
    parser.add_argument("--pc", type=int, default=2, dest="n_pcs", help="number of PCs to traverse (default 2)")
    parser.add_argument("--traversal-points", type=int, default=10, help="volumes per PC traversal (default 10)")
    parser.add_argument("-o", "--outdir", default=None, help="output directory (default RUN_DIR/analyze.EPOCH)")
    parser.add_argument("--device", default=None, help="torch device for volumes (default: cuda if available, else cpu)")
    parser.add_argument("--no-umap", action="store_true", help="skip the UMAP embedding")
    parser.add_argument(
        "--umap-max-fit", type=int, default=50_000, help="UMAP is fitted on at most this many particles (default 50000)"
    )
    parser.add_argument("--no-volumes", action="store_true", help="latent analysis only: do not decode volumes")
    parser.add_argument("-D", "--vol-D", type=int, default=None, help="box size of the volumes (default: training box)")
    parser.add_argument("--seed", type=int, default=0, help="seed for k-means and UMAP (default 0)")


def main(args: argparse.Namespace) -> int:
    from distdrgn.analysis.analyze import analyze

    # our progress lines only; libraries (faiss, numba) stay at warnings
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("distdrgn").setLevel(logging.INFO)
    report = analyze(
        args.run_dir,
        epoch=epoch_argument(args),
        ksample=args.ksample,
        n_pcs=args.n_pcs,
        out=args.outdir,
        device=args.device,
        umap=not args.no_umap,
        umap_max_fit=args.umap_max_fit,
        traversal_points=args.traversal_points,
        volumes=not args.no_volumes,
        vol_D=args.vol_D,
        seed=args.seed,
    )
    print(f"report: {report}")
    return 0
