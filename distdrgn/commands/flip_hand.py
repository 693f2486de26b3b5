"""``distdrgn flip-hand VOL.mrc -o OUT.mrc``: invert the handedness by mirroring along z (cryoDRGN ``flip_hand``)."""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("volume", metavar="VOL.mrc")
    parser.add_argument("-o", "--out", metavar="OUT.mrc", default=None, help="output volume (default: VOL_flipped.mrc)")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distdrgn.formats.mrc import read_volume, write_mrc
    from distdrgn.volume_ops import flip_hand

    vol, apix = read_volume(args.volume)
    out = args.out or str(Path(args.volume).with_name(Path(args.volume).stem + "_flipped.mrc"))
    write_mrc(out, flip_hand(vol), apix if apix is not None else 1.0, is_volume=True)
    print(f"wrote {out}")
    return 0
