"""``distdrgn analyze-landscape``: volumes at many k-means centres, mask, PCA and clustering (cryoDRGN analyze_landscape)."""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN", help="training run directory (distdrgn or cryoDRGN)")
    parser.add_argument("--epoch", type=int, default=None,
                        help="epoch (from 1, as in z.N.pkl; negative from the end; default: the final z.pkl)")
    parser.add_argument("-M", "--sketch-size", dest="m", type=int, default=500,
                        help="number of volumes: k-means clusters of z, decoded at their on-data centres (default 500)")
    parser.add_argument("-D", "--vol-D", dest="vol_D", type=int, default=None,
                        help="box of the volumes (default: the training box, at most 128)")
    parser.add_argument("--n-clusters", type=int, default=5, help="clusters of volumes (default 5)")
    parser.add_argument("--linkage", default="average", choices=("average", "complete", "ward", "single"),
                        help="agglomerative clustering linkage (default average)")
    parser.add_argument("--pc-dim", type=int, default=20, help="PCs of volume space used for clustering (default 20)")
    parser.add_argument("--thresh", dest="threshold", type=float, default=None,
                        help="mask threshold on the mean volume (default: half its 99.99th percentile)")
    parser.add_argument("--dilate", type=float, default=10.0, help="mask dilation in Angstrom (default 10)")
    parser.add_argument("--dist", type=float, default=10.0, help="width of the mask's soft edge in Angstrom (default 10)")
    parser.add_argument("--batch", type=int, default=8, help="volumes decoded together (default 8)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("-o", "--out", default=None, help="output folder (default RUN/landscape.EPOCH)")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")


def main(args: argparse.Namespace) -> int:
    from distdrgn.analysis.landscape import analyze_landscape

    out = analyze_landscape(args.run_dir, epoch=args.epoch, m=args.m, vol_D=args.vol_D, n_clusters=args.n_clusters,
                            linkage=args.linkage, pc_dim=args.pc_dim, threshold=args.threshold, dilate=args.dilate,
                            dist=args.dist, batch=args.batch, device=args.device, out=args.out, seed=args.seed)
    print(f"landscape analysis written to {out} (report: {out / 'report.html'})")
    return 0
