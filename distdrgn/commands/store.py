"""``distdrgn store info|verify|export``: inspect, check or convert a particle store."""

from __future__ import annotations

import argparse
import json
import sys


def add_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    p = sub.add_parser("info", help="print a JSON summary of a store",
                       description="Print a JSON summary of a particle store: particle count, box size, pixel size, "
                                   "dtype, levels, chunk/shard layout, size on disk, normalisation statistics, "
                                   "provenance and the last verification. Reads only metadata.")
    p.add_argument("store")
    p = sub.add_parser("verify", help="recompute checksums and check shapes, dtypes and finite values; "
                       "records the result in the store",
                       description="Read every image chunk of every level and compare it with the crc32c recorded "
                                   "at ingest; check the poses, CTF and index arrays (shape, dtype, finite values, "
                                   "checksum) and that no chunk file is missing. Exit 0 with 'ok: ...', or exit 2 "
                                   "with one error line naming the first damaged chunk and its particles. The "
                                   "result is recorded in the store (unless --no-record); training refuses a store "
                                   "whose recorded verification failed (data.allow_unverified=true overrides).")
    p.add_argument("store")
    p.add_argument("--no-record", action="store_true",
                   help="do not write the result into the store's attributes (training refuses a store whose "
                        "recorded verification failed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("export", help="write a store's particles as .mrcs, or their original .star/.cs rows",
                       description="Write a store's particles (all, or those of --ind, at the full box or --level) "
                                   "as an .mrcs stack, or their original .star/.cs rows (every column, pointing at "
                                   "the original stacks), or with --new-stack both a new .mrcs and a .star/.cs "
                                   "describing it.")
    p.add_argument("store")
    p.add_argument("-o", "--out", required=True,
                   help="OUT.mrcs (images), OUT.star or OUT.cs (the particles' original rows from the source "
                        ".star/.cs, every column, pointing at the original stacks)")
    p.add_argument("--new-stack", action="store_true",
                   help="with OUT.star/OUT.cs: write the images to OUT.mrcs and a star/cs describing them "
                        "(poses/CTF only); needed for stores made from bare .mrcs/.txt")
    p.add_argument("--ind", help="pickle of store positions to export (in that order)")
    p.add_argument("--poses", help="poses.pkl whose poses replace the store's in the .star/.cs (e.g. RUN/poses.pkl "
                                   "of `distdrgn abinit` or of a run with model.pose_refine=true)")
    p.add_argument("--level", type=int, help="box size to export (default: the full size)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    if args.action == "info":
        from distdrgn.store.verify import info

        print(json.dumps(info(args.store), indent=2))
    elif args.action == "verify":
        from distdrgn.store.verify import verify

        result = verify(args.store, progress=not args.no_progress, record=not args.no_record)
        bad = result["nonfinite"]
        if bad:  # only possible in a store ingested with --allow-nonfinite
            shown = ", ".join(map(str, bad[:20])) + (f", ... ({len(bad)} in all)" if len(bad) > 20 else "")
            print(f"warning: {result['path']}: {len(bad)} image(s) with non-finite pixels (ingested with "
                  f"--allow-nonfinite), store positions: {shown}", file=sys.stderr)
        print(f"ok: {result['path']}: {result['n']} images, levels {result['levels']}, {result['chunks_checked']} chunks verified")
    elif args.action == "export":
        from distdrgn.store.export import export

        written = export(args.store, args.out, ind=args.ind, level=args.level, force=args.force,
                         progress=not args.no_progress, new_stack=args.new_stack, poses=args.poses)
        for path in written:
            print(f"wrote {path}")
    return 0
