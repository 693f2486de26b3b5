"""``distdrgn downsample-vol VOL.mrc -D BOX -o OUT.mrc``: Fourier-crop a volume (cryoDRGN ``downsample --is-vol``)."""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("volume", metavar="VOL.mrc")
    parser.add_argument("-D", type=int, required=True, dest="box", metavar="BOX", help="new box size (even, <= the current one)")
    parser.add_argument("-o", "--out", metavar="OUT.mrc", required=True)
    parser.add_argument("--apix", type=float, default=None, help="input voxel size in A (default: from the header, else 1)")


def main(args: argparse.Namespace) -> int:
    from distdrgn.formats.mrc import read_volume, write_mrc
    from distdrgn.volume_ops import downsample_volume, downsampled_apix

    vol, header_apix = read_volume(args.volume)
    apix = args.apix if args.apix is not None else (header_apix or 1.0)
    out = downsample_volume(vol, args.box)
    new_apix = downsampled_apix(apix, vol.shape[0], args.box)
    write_mrc(args.out, out, new_apix, is_volume=True)
    print(f"wrote {args.out}: box {vol.shape[0]} -> {args.box}, voxel size {apix:.4g} -> {new_apix:.4g} A")
    return 0
