"""``distdrgn filter Z.pkl|RUN_DIR -o IND.pkl``: draw a lasso around particles in a latent-space plot."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("latents", metavar="Z.pkl|RUN_DIR", help="latent file (z.pkl) or training run directory")
    parser.add_argument("--epoch", type=int, default=None, help="epoch of z.EPOCH.pkl when given a run directory")
    parser.add_argument("--plot", choices=["umap", "pca"], default=None,
                        help="embedding to draw (default: umap when available, else the first two PCs)")
    parser.add_argument("--umap", metavar="UMAP.npy", help="UMAP embedding (default: RUN_DIR/analyze.EPOCH/umap.npy)")
    parser.add_argument("--kmeans-labels", metavar="FILE", help="colour the points by these cluster labels")
    parser.add_argument("--save-polygon", metavar="FILE",
                        help="also write the lasso path (JSON) for 'distdrgn select --umap-polygon'")
    parser.add_argument("-o", "--out", required=True, help="output IND.pkl, written when 's' is pressed")


def main(args: argparse.Namespace) -> int:
    from distdrgn.analysis import lasso
    from distdrgn.analysis import select as S
    from distdrgn.analysis.inputs import load_latent_source
    from distdrgn.analysis.latent import fit_pca
    from distdrgn.errors import DistdrgnError

    if not lasso.display_available():
        raise DistdrgnError("no display for the interactive lasso (DISPLAY unset); select non-interactively with "
                            "'distdrgn select --umap-polygon FILE' (or --kmeans-select, --pc-range, --z-norm-above)")
    src = load_latent_source(args.latents, args.epoch)
    n, zdim = src.z.shape
    umap_path = Path(args.umap) if args.umap else (src.analysis_dir / "umap.npy" if src.analysis_dir else None)
    use_umap = args.plot == "umap" or (args.plot is None and umap_path is not None and umap_path.is_file())
    if use_umap:
        if umap_path is None:
            raise DistdrgnError("--plot umap with a latent file needs --umap UMAP.npy")
        xy, axes = S.load_embedding(umap_path, n), ("UMAP1", "UMAP2")
    elif zdim >= 2:
        xy, axes = fit_pca(src.z).transform(src.z, 2), ("PC1", "PC2")
    else:
        raise DistdrgnError(f"{src.z_path}: zdim is 1, there is no 2-D plane to draw a lasso in")
    labels = S.load_labels(args.kmeans_labels, n) if args.kmeans_labels else None
    session = lasso.LassoSession(xy, args.out, args.save_polygon)
    count = lasso.run_lasso(session, labels, *axes)
    if count == 0:
        print("window closed without saving; nothing written")
    return 0
