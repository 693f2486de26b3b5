"""``distdrgn pc-traversal Z.pkl --pc 1 -o z.txt``: latents along a principal component."""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("latents", metavar="Z.pkl|RUN_DIR", help="latent file (z.pkl) or training run directory")
    parser.add_argument("--pc", type=int, default=1, help="1-based principal component to traverse (default 1)")
    parser.add_argument("--n", type=int, default=10, help="number of points (default 10)")
    lim = parser.add_mutually_exclusive_group()
    lim.add_argument("--lim", type=float, nargs=2, metavar=("LO", "HI"),
                     help="start and end coordinate on the PC")
    lim.add_argument("--percentiles", type=float, nargs=2, metavar=("LO", "HI"), default=(5.0, 95.0),
                     help="start and end as percentiles of the particles' PC coordinates (default 5 95)")
    parser.add_argument("--epoch", type=int, default=None, help="epoch of z.EPOCH.pkl when given a run directory")
    parser.add_argument("-o", "--out", required=True, help="output text file of latents, one row per point")


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from distdrgn.analysis import latent
    from distdrgn.analysis.inputs import load_latent_source, save_latents_txt
    from distdrgn.errors import DistdrgnError

    src = load_latent_source(args.latents, args.epoch)
    zdim = src.z.shape[1]
    if not 1 <= args.pc <= zdim:
        raise DistdrgnError(f"--pc {args.pc}: PCs are numbered 1..{zdim} (zdim {zdim})")
    if args.n < 2:
        raise DistdrgnError(f"--n must be >= 2, got {args.n}")
    lo_p, hi_p = args.percentiles
    if not (0 <= lo_p <= 100 and 0 <= hi_p <= 100):
        raise DistdrgnError(f"--percentiles must be in [0, 100], got {lo_p} {hi_p}")
    pca = latent.fit_pca(src.z)
    pc = args.pc - 1
    if args.lim is not None:
        t = np.linspace(args.lim[0], args.lim[1], args.n)
        coords = np.zeros((args.n, pc + 1))
        coords[:, pc] = t
        zt = pca.inverse_transform(coords)
    else:
        t, zt = latent.pc_traversal(pca, pca.transform(src.z, pc + 1), pc, n_points=args.n,
                                    lo_percentile=lo_p, hi_percentile=hi_p)
    save_latents_txt(args.out, zt)
    ratio = pca.explained_variance_ratio[pc]
    print(f"PC{args.pc} ({100 * ratio:.1f}% of the variance): {args.n} points from {t[0]:.4g} to {t[-1]:.4g}")
    print(f"wrote {len(zt)} latents to {args.out}")
    return 0
