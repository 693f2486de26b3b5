"""``distdrgn fsc A.mrc B.mrc``: Fourier shell correlation and resolution at 0.5 and 0.143."""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("vol1", metavar="A.mrc")
    parser.add_argument("vol2", metavar="B.mrc")
    parser.add_argument("--mask", metavar="M.mrc", help="multiply both volumes by this mask first")
    parser.add_argument("--apix", type=float, default=None, help="voxel size in A (default: from A.mrc's header)")
    parser.add_argument("--plot", metavar="PNG", help="write the FSC curve to this image")
    parser.add_argument("-o", "--out", metavar="TXT", help="write the curve as text (frequency, FSC)")


def main(args: argparse.Namespace) -> int:
    from distdrgn.analysis.reconstruct import (
        masked_fsc,
        plot_fsc,
        summarize_fsc,
        write_fsc_txt,
    )
    from distdrgn.formats.mrc import read_volume

    a, apix_a = read_volume(args.vol1)
    b, _ = read_volume(args.vol2)
    mask = read_volume(args.mask)[0] if args.mask else None
    apix = args.apix if args.apix is not None else apix_a
    freqs, curve = masked_fsc(a, b, mask)
    summary = summarize_fsc(freqs, curve, apix)
    if args.out:
        write_fsc_txt(args.out, freqs, curve, apix)
        print(f"wrote {args.out}")
    if args.plot:
        plot_fsc(args.plot, freqs, curve, summary, title=f"FSC {args.vol1} vs {args.vol2}")
        print(f"wrote {args.plot}")
    print(summary.describe())
    return 0
