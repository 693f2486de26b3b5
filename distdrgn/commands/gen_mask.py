"""``distdrgn gen-mask VOL.mrc -o MASK.mrc``: soft mask by threshold, dilation and cosine edge (cryoDRGN ``gen_mask``)."""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("volume", metavar="VOL.mrc")
    parser.add_argument("-o", "--out", metavar="MASK.mrc", required=True, help="output mask (voxel size kept)")
    parser.add_argument(
        "--threshold", type=float, default=None,
        help="density threshold of the initial mask (default: half the 99.99th percentile, ~half the max)",
    )
    parser.add_argument("--dilate", type=float, default=25.0, help="dilate the thresholded mask by this many A (default: 25)")
    parser.add_argument("--dist", type=float, default=15.0, help="width of the cosine soft edge in A (default: 15)")
    parser.add_argument("--apix", type=float, default=None, help="voxel size in A (default: from the header, else 1)")


def main(args: argparse.Namespace) -> int:
    from distdrgn.formats.mrc import read_volume, write_mrc
    from distdrgn.volume_ops import default_mask_threshold, soft_mask

    vol, header_apix = read_volume(args.volume)
    apix = args.apix if args.apix is not None else (header_apix or 1.0)
    thr = args.threshold if args.threshold is not None else default_mask_threshold(vol)
    mask = soft_mask(vol, thr, args.dilate, args.dist, apix)
    write_mrc(args.out, mask, apix, is_volume=True)
    print(
        f"wrote {args.out}: threshold {thr:.5g}, dilation {args.dilate / apix:.2f} px, "
        f"cosine edge {args.dist / apix:.2f} px, {float((mask > 0.5).mean()) * 100:.1f}% of voxels > 0.5"
    )
    return 0
