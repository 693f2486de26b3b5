"""``distdrgn select Z.pkl|RUN_DIR (criteria) -o IND.pkl``: a particle subset from the latent space."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("latents", metavar="Z.pkl|RUN_DIR", nargs="?",
                        help="latent file (z.pkl) or training run directory (optional with --random "
                             "--n-particles)")
    parser.add_argument("--epoch", type=int, default=None, help="epoch of z.EPOCH.pkl when given a run directory")
    parser.add_argument("--kmeans-labels", metavar="FILE",
                        help="cluster labels, e.g. analyze's kmeansK/labels.pkl (use with --kmeans-select)")
    parser.add_argument("--kmeans-select", type=int, nargs="+", metavar="K", help="cluster label(s) to keep")
    parser.add_argument("--z-norm-above", type=float, metavar="X", help="keep particles with |z| > X")
    parser.add_argument("--z-norm-below", type=float, metavar="X", help="keep particles with |z| < X")
    parser.add_argument("--umap-polygon", metavar="FILE",
                        help="keep particles inside this polygon of the UMAP plane (JSON [[x, y], ...] or "
                        "'x y' text lines)")
    parser.add_argument("--umap", metavar="UMAP.npy",
                        help="UMAP embedding for --umap-polygon (default: RUN_DIR/analyze.EPOCH/umap.npy)")
    parser.add_argument("--pc-range", nargs=3, metavar=("PC", "LO", "HI"),
                        help="keep particles whose coordinate on PC (1-based) is in [LO, HI]")
    parser.add_argument("--random", type=int, metavar="N",
                        help="instead of criteria: N particles drawn uniformly at random (cryoDRGN's select_random), "
                             "out of --n-particles or the particles of Z.pkl|RUN_DIR")
    parser.add_argument("--n-particles", type=int, metavar="TOTAL",
                        help="with --random: the total number of particles to draw from")
    parser.add_argument("--seed", type=int, default=0, help="with --random: random seed (default 0)")
    parser.add_argument("-s", "--save-rest", metavar="OTHER.pkl",
                        help="with --random: also write the particles not selected to this IND.pkl")
    parser.add_argument("--invert", action="store_true", help="keep the particles the criteria reject instead")
    parser.add_argument("-o", "--out", required=True, help="output IND.pkl (sorted int64 positions)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")


def main(args: argparse.Namespace) -> int:
    from distdrgn.analysis import select as S
    from distdrgn.analysis.inputs import load_latent_source
    from distdrgn.errors import DistdrgnError
    from distdrgn.formats.ind import save_indices

    from distdrgn.pickles import check_output

    out = check_output(args.out, args.force)
    if args.random is not None:
        return _main_random(args, out)
    for opt, value in (("--n-particles", args.n_particles), ("-s/--save-rest", args.save_rest)):
        if value is not None:
            raise DistdrgnError(f"{opt} goes with --random")
    if args.latents is None:
        raise DistdrgnError("give a latent file (z.pkl) or run directory, or --random N --n-particles TOTAL")
    if (args.kmeans_labels is None) != (args.kmeans_select is None):
        raise DistdrgnError("--kmeans-labels and --kmeans-select go together")
    src = load_latent_source(args.latents, args.epoch)
    n = len(src.z)
    masks, criteria = [], []
    if args.kmeans_labels is not None:
        masks.append(S.mask_labels(S.load_labels(args.kmeans_labels, n), args.kmeans_select))
        criteria.append(f"cluster in {args.kmeans_select}")
    if args.z_norm_above is not None or args.z_norm_below is not None:
        masks.append(S.mask_z_norm(src.z, args.z_norm_above, args.z_norm_below))
        criteria.append("|z| " + " and ".join(
            s for s in (f"> {args.z_norm_above}" if args.z_norm_above is not None else "",
                        f"< {args.z_norm_below}" if args.z_norm_below is not None else "") if s))
    if args.umap_polygon is not None:
        emb_path = args.umap
        if emb_path is None:
            if src.analysis_dir is None:
                raise DistdrgnError("--umap-polygon with a latent file needs --umap UMAP.npy")
            emb_path = src.analysis_dir / "umap.npy"
        masks.append(S.points_in_polygon(S.load_embedding(emb_path, n), S.load_polygon(args.umap_polygon)))
        criteria.append(f"inside the UMAP polygon {args.umap_polygon}")
    if args.pc_range is not None:
        try:
            pc, lo, hi = int(args.pc_range[0]), float(args.pc_range[1]), float(args.pc_range[2])
        except ValueError:
            raise DistdrgnError(f"--pc-range expects PC (integer) LO HI, got {' '.join(args.pc_range)}") from None
        masks.append(S.mask_pc_range(src.z, pc, lo, hi))
        criteria.append(f"PC{pc} in [{lo}, {hi}]")
    if not masks:
        raise DistdrgnError("no selection criterion: give --kmeans-labels/--kmeans-select, --z-norm-above/below, "
                            "--umap-polygon or --pc-range")
    ind = S.selection_indices(masks, n, invert=args.invert)
    if ind.size == 0:
        raise DistdrgnError(f"the criteria select no particle ({'not ' if args.invert else ''}{'; '.join(criteria)})")
    try:
        save_indices(out, ind)
    except OSError as exc:
        raise DistdrgnError(f"{out}: cannot write the selection ({exc.strerror or exc})") from None
    print(f"selected {ind.size} of {n} particles ({100 * ind.size / n:.1f}%): "
          f"{'not ' if args.invert else ''}{'; '.join(criteria)}")
    print(f"wrote {out}")
    return 0


def _main_random(args: argparse.Namespace, out: Path) -> int:
    """``--random N``: a seeded uniform random subset (and, with ``-s``, the rest)."""
    from distdrgn.errors import DistdrgnError
    from distdrgn.formats.ind import save_indices
    from distdrgn.pickles import check_output, random_selection

    given = [opt for opt, value in (("--kmeans-labels", args.kmeans_labels), ("--kmeans-select", args.kmeans_select),
                                    ("--z-norm-above", args.z_norm_above), ("--z-norm-below", args.z_norm_below),
                                    ("--umap-polygon", args.umap_polygon), ("--pc-range", args.pc_range),
                                    ("--invert", args.invert or None)) if value is not None]
    if given:
        raise DistdrgnError(f"--random does not combine with {', '.join(given)} (use -s to write the rest)")
    n = args.n_particles
    if args.latents is not None:
        from distdrgn.analysis.inputs import load_latent_source

        n_latent = len(load_latent_source(args.latents, args.epoch).z)
        if n is not None and n != n_latent:
            raise DistdrgnError(f"--n-particles {n} but {args.latents} has {n_latent} particles")
        n = n_latent
    if n is None:
        raise DistdrgnError("--random needs --n-particles TOTAL (or a latent file / run directory)")
    rest_out = None
    if args.save_rest is not None:
        rest_out = check_output(args.save_rest, args.force)
        if rest_out.resolve() == out.resolve():
            raise DistdrgnError(f"-o and -s are the same file ({out})")
    chosen, rest = random_selection(args.random, n, seed=args.seed)
    try:
        save_indices(out, chosen)
        if rest_out is not None:
            save_indices(rest_out, rest)
    except OSError as exc:
        raise DistdrgnError(f"cannot write the selection ({exc.strerror or exc})") from None
    print(f"selected {chosen.size} of {n} particles ({100 * chosen.size / n:.1f}%) at random (seed {args.seed})")
    print(f"wrote {out}")
    if rest_out is not None:
        print(f"wrote {rest_out} (the other {rest.size} particles)")
    return 0
