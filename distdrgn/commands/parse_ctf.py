"""``distdrgn parse-ctf``: RELION .star / cryoSPARC .cs CTF parameters -> cryoDRGN ``ctf.pkl``."""

from __future__ import annotations

import argparse
from pathlib import Path

from distdrgn.errors import DistdrgnError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="RELION .star or cryoSPARC .cs file")
    parser.add_argument("-D", type=int, default=None,
                        help="box size in pixels (default: _rlnImageSize or blob/shape; required for RELION 3.0)")
    parser.add_argument("--apix", type=float, default=None, help="pixel size in A (overrides the file)")
    parser.add_argument("--kv", type=float, default=None, help="accelerating voltage in kV (overrides the file)")
    parser.add_argument("--cs", type=float, default=None, help="spherical aberration in mm (overrides the file)")
    parser.add_argument("-w", type=float, default=None, help="amplitude contrast ratio (overrides the file)")
    parser.add_argument("--ps", type=float, default=None,
                        help="phase shift in degrees (overrides the file; 0 when the file has none)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output ctf.pkl")
    parser.add_argument("--force", action="store_true", help="overwrite the output if it exists")


def _range(values, fmt: str) -> str:
    lo, hi = float(values.min()), float(values.max())
    return format(lo, fmt) if lo == hi else f"{lo:{fmt}} to {hi:{fmt}}"


def main(args) -> int:
    from distdrgn.formats.ctf_params import parse_ctf, save_ctf

    if args.output.exists() and not args.force:
        raise DistdrgnError(f"{args.output}: already exists; pass --force to overwrite")
    if not args.output.parent.is_dir():
        raise DistdrgnError(f"{args.output}: folder {args.output.parent} does not exist")
    ctf = parse_ctf(args.input, D=args.D, apix=args.apix, kv=args.kv, cs=args.cs, w=args.w, ps=args.ps)
    save_ctf(args.output, ctf)
    print(f"parsed CTF parameters of {len(ctf)} particles from {args.input}")
    print(f"  box {_range(ctf[:, 0], '.0f')} px, pixel size {_range(ctf[:, 1], '.4g')} A")
    print(f"  defocus U {_range(ctf[:, 2], '.0f')} A, V {_range(ctf[:, 3], '.0f')} A, angle {_range(ctf[:, 4], '.1f')} deg")
    print(f"  voltage {_range(ctf[:, 5], '.0f')} kV, Cs {_range(ctf[:, 6], '.3g')} mm, "
          f"amplitude contrast {_range(ctf[:, 7], '.3g')}, phase shift {_range(ctf[:, 8], '.1f')} deg")
    print(f"wrote {args.output}")
    return 0
