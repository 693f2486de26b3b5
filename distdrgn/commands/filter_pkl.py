"""``distdrgn filter-pkl IN.pkl --ind IND.pkl -o OUT.pkl``: the rows of a pickle at given positions."""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN.pkl",
                        help="poses.pkl, ctf.pkl, z.pkl (both arrays are filtered) or an index pickle")
    parser.add_argument("--ind", required=True, metavar="IND.pkl",
                        help="pickle of the 0-based row positions to keep (in that order)")
    parser.add_argument("-o", "--out", required=True, help="output pickle (same layout as the input)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")


def main(args: argparse.Namespace) -> int:
    from distdrgn.pickles import check_output, filter_pkl, write_pickle_contents

    out = check_output(args.out, args.force)
    result, idx, n = filter_pkl(args.input, args.ind)
    write_pickle_contents(out, result)
    print(f"kept {idx.size} of {n} rows: {result.describe()}")
    print(f"wrote {out}")
    return 0
