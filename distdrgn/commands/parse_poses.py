"""``distdrgn parse-poses``: RELION .star / cryoSPARC .cs poses -> cryoDRGN ``poses.pkl``."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from distdrgn.errors import DistdrgnError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="RELION .star or cryoSPARC .cs file with 3D alignments")
    parser.add_argument("-D", type=int, default=None,
                        help="box size of the particle images in pixels (translations are stored as a fraction "
                             "of it); required for RELION 3.0 star files, otherwise read from the file")
    parser.add_argument("--apix", type=float, default=None,
                        help="pixel size in A, to convert RELION 3.1+ origins in Angstrom (default: the optics group's)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output poses.pkl")
    parser.add_argument("--force", action="store_true", help="overwrite the output if it exists")


def main(args) -> int:
    from distdrgn.formats.poses import parse_poses, rot_to_euler, save_poses

    if args.output.exists() and not args.force:
        raise DistdrgnError(f"{args.output}: already exists; pass --force to overwrite")
    if not args.output.parent.is_dir():
        raise DistdrgnError(f"{args.output}: folder {args.output.parent} does not exist")
    rots, trans = parse_poses(args.input, args.D, args.apix)
    save_poses(args.output, rots, trans)
    tilt = rot_to_euler(rots)[:, 1]
    shift = np.linalg.norm(trans, axis=1)
    print(f"parsed {len(rots)} poses from {args.input}")
    print(f"  tilt: {tilt.min():.1f} to {tilt.max():.1f} deg")
    print(f"  translation (fraction of box): x {trans[:, 0].min():.4f} to {trans[:, 0].max():.4f}, "
          f"y {trans[:, 1].min():.4f} to {trans[:, 1].max():.4f}, |t| max {shift.max():.4f}")
    print(f"wrote {args.output}")
    return 0
