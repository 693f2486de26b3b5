"""``distdrgn concat-pkls A.pkl B.pkl ... -o OUT.pkl``: row-wise concatenation of pickles."""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IN.pkl",
                        help="pickles of the same layout: index arrays, ctf.pkl arrays, poses.pkl tuples or "
                             "z.pkl files (z_mu and z_logvar are both concatenated)")
    parser.add_argument("-o", "--out", required=True, help="output pickle")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")


def main(args: argparse.Namespace) -> int:
    from distdrgn.pickles import check_output, concat_pkls, write_pickle_contents

    out = check_output(args.out, args.force)
    result = concat_pkls(args.inputs)
    write_pickle_contents(out, result)
    print(f"concatenated {len(args.inputs)} pickles: {result.describe()}")
    print(f"wrote {out}")
    return 0
