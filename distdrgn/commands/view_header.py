"""``distdrgn view-header FILE``: the header of an .mrc/.mrcs, .star, .cs or particle store."""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="FILE",
                        help=".mrc/.mrcs (box, images, voxel size, mode, origin), .star (tables, rows, columns), "
                             ".cs (records, fields and dtypes) or a particle store directory (as `store info`)")
    parser.add_argument("--json", action="store_true", help="print the header as JSON")


def main(args: argparse.Namespace) -> int:
    import json

    from distdrgn.formats.header import format_header, jsonable, view_header

    kind, header = view_header(args.path)
    print(json.dumps(jsonable(header), indent=2) if args.json else format_header(kind, header))
    return 0
