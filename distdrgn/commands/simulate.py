"""``distdrgn simulate``: a heterogeneous particle dataset with ground truth."""

from __future__ import annotations

import argparse


def add_args(parser: argparse.ArgumentParser) -> None:
    from distdrgn.simulate import DISTRIBUTIONS

    parser.add_argument("out", help="output directory (created if missing)")
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("-D", type=int, required=True, help="box size in pixels (even)")
    parser.add_argument("--snr", type=float, required=True,
                        help="signal-to-noise ratio var(signal)/var(noise) (inf: no noise)")  # fmt: skip
    parser.add_argument("--dist", choices=list(DISTRIBUTIONS), default="uniform",
                        help="; ".join(f"{k}: {v}" for k, v in DISTRIBUTIONS.items()))  # fmt: skip
    parser.add_argument("--apix", type=float, default=None, help="pixel size in Angstrom (default: 192 / D)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--model-seed", type=int, default=0, help="seed of the pseudo-atomic model (default 0)")
    parser.add_argument("--n-states", type=int, default=5,
                        help="conformation states for --dist discrete and ground-truth volumes (default 5)")  # fmt: skip
    parser.add_argument("--shift-std", type=float, default=2.0, help="std of the in-plane offsets in pixels (default 2)")
    parser.add_argument("-b", "--batch-size", type=int, default=256, help="images per batch (default 256)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--force", action="store_true", help="overwrite a simulated dataset already in OUT")
    parser.add_argument("--no-volumes", action="store_true", help="do not write the ground-truth volumes")


def main(args: argparse.Namespace) -> int:
    from distdrgn.simulate import simulate

    paths = simulate(
        args.out, args.n, args.D, args.snr, dist=args.dist, apix=args.apix, seed=args.seed,
        model_seed=args.model_seed, n_states=args.n_states, shift_std_px=args.shift_std,
        batch_size=args.batch_size, device=args.device, write_volumes=not args.no_volumes, force=args.force,
    )  # fmt: skip
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0
