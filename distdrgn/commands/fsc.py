"""``distdrgn fsc A.mrc B.mrc [C.mrc D.mrc ...]``: Fourier shell correlation and resolution at 0.5 and 0.143.

With one pair the output is unchanged from earlier versions. Several pairs (or ``--curves``
files written by ``-o``) are drawn together by ``--plot``; ``--corrected`` adds cryoDRGN's
phase-randomised (mask-corrected) curve.
"""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("volumes", metavar="A.mrc B.mrc", nargs="*", help="pairs of volumes to compare (A B [C D ...])")
    parser.add_argument("--mask", metavar="M.mrc", help="multiply both volumes by this mask first")
    parser.add_argument("--apix", type=float, default=None, help="voxel size in A (default: from A.mrc's header)")
    parser.add_argument("--plot", metavar="PNG", help="write the FSC curve(s) to this image")
    parser.add_argument("-o", "--out", metavar="TXT", help="write the curve as text (frequency, FSC)")
    parser.add_argument(
        "--corrected", type=float, default=None, metavar="RES",
        help="also compute the mask-corrected FSC with phases randomised beyond RES "
        "(>= 1: Angstrom; < 1: cycles/pixel), as cryoDRGN's --corrected; the summary is then the corrected curve's",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the phase randomisation (default: 0)")
    parser.add_argument(
        "--curves", metavar="TXT", nargs="+", default=[],
        help="FSC text files (from -o, or cryoDRGN's pixres/fsc files) to draw in the --plot as well",
    )


def _write_multi(path, freqs, columns: dict, apix) -> None:
    import numpy as np

    data = [freqs] + ([freqs / apix] if apix else []) + list(columns.values())
    names = ["freq_1/px"] + (["freq_1/A"] if apix else []) + [n.replace(" ", "_") for n in columns]
    np.savetxt(path, np.column_stack(data), fmt="%.6g", header=" ".join(names))


def main(args: argparse.Namespace) -> int:
    from distdrgn.analysis.reconstruct import (
        masked_fsc,
        plot_fsc,
        summarize_fsc,
        write_fsc_txt,
    )
    from distdrgn.errors import DistdrgnError
    from distdrgn.formats.mrc import read_volume
    from distdrgn.volume_ops import corrected_freq, corrected_fsc, plot_fsc_curves, read_fsc_curves

    if len(args.volumes) % 2:
        raise DistdrgnError(f"volumes come in pairs (A B [C D ...]); got {len(args.volumes)}")
    if not args.volumes and not args.curves:
        raise DistdrgnError("nothing to do: give pairs of volumes and/or --curves files")
    if args.curves and not args.plot:
        raise DistdrgnError("--curves only adds curves to a --plot")
    if args.corrected is not None and not args.volumes:
        raise DistdrgnError("--corrected needs a pair of volumes")
    mask = read_volume(args.mask)[0] if args.mask else None
    pairs = [(args.volumes[i], args.volumes[i + 1]) for i in range(0, len(args.volumes), 2)]
    apix = args.apix
    plotted: dict = {}
    columns: dict = {}
    freqs = None
    single = None
    for n, (pa, pb) in enumerate(pairs):
        a, apix_a = read_volume(pa)
        b, _ = read_volume(pb)
        if apix is None:
            apix = apix_a
        label = f"{pa} vs {pb}"
        if args.corrected is not None:
            if mask is not None and mask.shape != a.shape:
                raise DistdrgnError(f"mask shape {mask.shape} differs from the volumes' {a.shape}")
            if a.shape != b.shape:
                raise DistdrgnError(f"volumes have different shapes {a.shape} and {b.shape}")
            f0 = corrected_freq(args.corrected, apix)
            freqs, curve, corr, s0 = corrected_fsc(a, b, mask, f0, seed=args.seed)
            plotted[label] = (freqs, curve)
            plotted[f"{label} corrected"] = (freqs, corr)
            columns[f"fsc_{n + 1}" if len(pairs) > 1 else "fsc"] = curve
            columns[f"fsc_corrected_{n + 1}" if len(pairs) > 1 else "fsc_corrected"] = corr
            summary = summarize_fsc(freqs, corr, apix)
            print(f"{pa} vs {pb}: phases randomised from shell {s0} ({f0:.4f} 1/px) on")
            print(f"{pa} vs {pb} plain: {summarize_fsc(freqs, curve, apix).describe()}")
        else:
            freqs, curve = masked_fsc(a, b, mask)
            plotted[label] = (freqs, curve)
            columns[f"fsc_{n + 1}" if len(pairs) > 1 else "fsc"] = curve
            summary = summarize_fsc(freqs, curve, apix)
        if len(pairs) == 1 and args.corrected is None:
            single = (freqs, curve, summary)
            continue
        print((f"{pa} vs {pb} corrected: " if args.corrected is not None else f"{pa} vs {pb}: ") + summary.describe())
    if args.out:
        if single is not None:
            write_fsc_txt(args.out, single[0], single[1], apix)
        elif freqs is not None:
            if len({len(c) for c in columns.values()}) > 1:
                raise DistdrgnError("-o with several pairs needs volumes of one box size")
            _write_multi(args.out, freqs, columns, apix)
        print(f"wrote {args.out}")
    if args.plot:
        if single is not None and not args.curves:
            plot_fsc(args.plot, single[0], single[1], single[2], title=f"FSC {pairs[0][0]} vs {pairs[0][1]}")
        else:
            for path in args.curves:
                cf, cc = read_fsc_curves(path)
                for lbl, c in cc.items():
                    plotted[lbl] = (cf, c)
            plot_fsc_curves(args.plot, plotted, apix=apix, title="FSC")
        print(f"wrote {args.plot}")
    if single is not None:
        print(single[2].describe())
    return 0
