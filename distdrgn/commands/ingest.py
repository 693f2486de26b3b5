"""``distdrgn ingest``: particle stacks (+ poses, CTF) -> a Zarr particle store."""

from __future__ import annotations

import argparse

from distdrgn.errors import StoreError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("particles", help="particles: .mrcs/.mrc stack, .txt list of stacks, RELION .star or cryoSPARC .cs")
    parser.add_argument("-o", "--out", required=True, help="output store directory (e.g. particles.zarr)")
    parser.add_argument("--poses", help="cryoDRGN poses.pkl (default: from the .star/.cs, if any)")
    parser.add_argument("--ctf", help="cryoDRGN ctf.pkl (default: from the .star/.cs, if any)")
    parser.add_argument("--datadir", help="directory to find the stacks named in a .star/.cs/.txt")
    parser.add_argument("-D", type=int, dest="D", help="Fourier-crop the images to this box size (even, <= box)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored pixel type (default float32)")
    parser.add_argument("--ind", help="pickle of particle indices to keep (in that order)")
    parser.add_argument("--levels", default="", help="extra lower box sizes to store as well, e.g. 64,128")
    parser.add_argument("--workers", type=int, help="parallel shard writers (default: one per CPU, at most 8, within a 2 GiB memory budget)")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="store images with NaN/inf pixels instead of refusing them (recorded in the store; for "
                             "testing how training copes)")
    parser.add_argument("--force", action="store_true", help="replace an existing store or discard a different unfinished ingest")
    meta = parser.add_argument_group("metadata a .star/.cs lacks (or overrides), as in parse-ctf")
    meta.add_argument("--apix", type=float, help="pixel size of the source images (Angstrom)")
    meta.add_argument("--kv", type=float, help="accelerating voltage (kV)")
    meta.add_argument("--cs", type=float, help="spherical aberration (mm)")
    meta.add_argument("-w", type=float, dest="w", help="amplitude contrast")
    meta.add_argument("--ps", type=float, help="phase shift (degrees)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from distdrgn.store.layout import parse_levels
    from distdrgn.store.writer import ingest

    try:
        levels = parse_levels(args.levels)
    except ValueError as exc:
        raise StoreError(str(exc)) from None
    out = ingest(
        args.particles,
        args.out,
        poses=args.poses,
        ctf=args.ctf,
        datadir=args.datadir,
        D=args.D,
        dtype=args.dtype,
        ind=args.ind,
        extra_levels=levels,
        force=args.force,
        workers=args.workers,
        progress=not args.no_progress,
        allow_nonfinite=args.allow_nonfinite,
        metadata_options={k: getattr(args, k) for k in ("apix", "kv", "cs", "w", "ps") if getattr(args, k) is not None},
    )
    print(f"wrote {out}")
    return 0
