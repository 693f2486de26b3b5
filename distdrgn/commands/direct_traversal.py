"""``distdrgn direct-traversal Z.pkl --anchors I J ... -o z.txt``: straight lines between particles' latents."""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("latents", metavar="Z.pkl|RUN_DIR", help="latent file (z.pkl) or training run directory")
    parser.add_argument("--anchors", type=int, nargs="+", required=True, metavar="I",
                        help="0-based particle indices to join in order (at least 2)")
    parser.add_argument("--n", type=int, default=10, help="points per segment, both ends included (default 10)")
    parser.add_argument("--loop", action="store_true", help="return from the last anchor to the first")
    parser.add_argument("--epoch", type=int, default=None, help="epoch of z.EPOCH.pkl when given a run directory")
    parser.add_argument("-o", "--out", required=True, help="output text file of latents, one row per point")


def main(args: argparse.Namespace) -> int:
    from distdrgn.analysis.inputs import load_latent_source, save_latents_txt
    from distdrgn.analysis.traversal import direct_traversal
    from distdrgn.errors import DistdrgnError

    src = load_latent_source(args.latents, args.epoch)
    n = len(src.z)
    bad = [a for a in args.anchors if not 0 <= a < n]
    if bad:
        raise DistdrgnError(f"anchor index {bad[0]} out of range for {n} latents (0-based, 0..{n - 1})")
    zt = direct_traversal(src.z[args.anchors], n_points=args.n, loop=args.loop)
    save_latents_txt(args.out, zt)
    print(f"wrote {len(zt)} latents to {args.out}")
    return 0
