"""``distdrgn backproject STORE [--ind IND.pkl] -o vol.mrc``: voxel back-projection with half-maps."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="particle store (with poses; CTF used when present)")
    parser.add_argument("-o", "--out", required=True, help="output volume .mrc (half-maps: OUT_half1.mrc, OUT_half2.mrc)")
    parser.add_argument("--ind", help="pickle of store positions to use (e.g. from 'distdrgn select')")
    parser.add_argument("--level", type=int, default=None, help="box size of the stored images to use (default: full)")
    parser.add_argument("--first", type=int, default=None, help="use only the first N selected particles")
    parser.add_argument("--uninvert-data", action="store_true",
                        help="do not multiply the images by -1 (default: invert, for white-particle stacks)")
    parser.add_argument("--no-half-maps", action="store_true", help="full map only (no half-maps, no FSC)")
    parser.add_argument("--nearest", action="store_true", help="nearest-voxel gridding instead of trilinear")
    parser.add_argument("--device", default=None, help="torch device for the accumulation (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from distdrgn.analysis.reconstruct import (
        backproject_store,
        masked_fsc,
        summarize_fsc,
    )
    from distdrgn.errors import DistdrgnError
    from distdrgn.formats.mrc import write_mrc

    out = Path(args.out)
    if out.suffix.lower() != ".mrc":
        raise DistdrgnError(f"{out}: the output volume must be a .mrc file")
    if not out.parent.is_dir():
        raise DistdrgnError(f"{out.parent}: output directory does not exist")
    rec = backproject_store(args.store, ind=args.ind, level=args.level, first=args.first,
                            invert=not args.uninvert_data, half_maps=not args.no_half_maps, device=args.device,
                            interpolation="nearest" if args.nearest else "trilinear",
                            progress=not args.no_progress)
    apix = rec.apix or 1.0
    write_mrc(out, rec.volume, apix, is_volume=True)
    print(f"back-projected {rec.positions.size} particles -> {out} (box {rec.volume.shape[0]}, {apix:.4g} A/voxel)")
    if rec.half1 is not None:
        for name, vol in (("half1", rec.half1), ("half2", rec.half2)):
            path = out.with_name(f"{out.stem}_{name}{out.suffix}")
            write_mrc(path, vol, apix, is_volume=True)
            print(f"wrote {path}")
        freqs, curve = masked_fsc(rec.half1, rec.half2)
        print(f"half-map {summarize_fsc(freqs, curve, rec.apix).describe()}")
    return 0
