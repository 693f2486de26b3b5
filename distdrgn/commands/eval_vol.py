"""``distdrgn eval-vol RUN_DIR (-z Z... | --z-start Z... --z-end Z... [-n N] | --zfile FILE) -o DIR``.

Volumes from a trained model: a distdrgn run directory, or a cryoDRGN 4.x one (its
config.yaml + weights*.pkl; see :mod:`distdrgn.cryodrgn_run`).
"""

from __future__ import annotations

from pathlib import Path


def add_args(parser) -> None:
    parser.add_argument("run_dir", help="training run directory, distdrgn or cryoDRGN 4.x (or a weights .pkl file)")
    parser.add_argument("-c", "--config", default=None,
                        help="cryoDRGN config.yaml (default: the one next to the weights, if it is a cryoDRGN run)")
    parser.add_argument("--epoch", type=int, default=None, help="use weights.EPOCH.pkl (default: weights.pkl, else the latest)")
    parser.add_argument("-z", type=float, nargs="+", default=None, metavar="Z",
                        help="latent value(s): zdim numbers per volume, several volumes as consecutive groups")
    parser.add_argument("--z-start", type=float, nargs="+", default=None, metavar="Z",
                        help="first latent of a straight path (with --z-end, -n); files numbered from 001 as cryoDRGN")
    parser.add_argument("--z-end", type=float, nargs="+", default=None, metavar="Z", help="last latent of the path")
    parser.add_argument("-n", type=int, default=10, help="number of volumes from --z-start to --z-end inclusive (default 10)")
    parser.add_argument("--zfile", default=None, help="text file of latents, one volume per row (zdim columns), or a z.pkl")
    parser.add_argument("--apix", type=float, default=None, help="voxel size in A (default: the store's pixel size)")
    parser.add_argument("-D", "--box", dest="D", type=int, default=None, help="volume box size (even; default: the training box)")
    parser.add_argument("--flip", action="store_true", help="mirror the volumes along z (invert the handedness)")
    parser.add_argument("--invert", action="store_true", help="invert the contrast of the volumes")
    parser.add_argument("--low-pass", type=float, default=None, metavar="A",
                        help="low-pass filter to this resolution in Angstrom (uses --apix, default 1)")
    parser.add_argument("--crop", type=int, default=None, metavar="BOX", help="crop the volumes to this (even) box, after filtering")
    parser.add_argument("--prefix", default="vol_", help="file name prefix (default vol_)")
    parser.add_argument("--vol-start-index", type=int, default=None,
                        help="number of the first file (default 1 with --z-start, as cryoDRGN; else 0)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("-o", "--outdir", required=True, help="output directory for vol_000.mrc, ...")


def read_latents(args, zdim: int):
    import numpy as np

    from distdrgn.checkpoint import load_z
    from distdrgn.errors import DistdrgnError
    from distdrgn.formats.ind import read_text_array

    z_start = getattr(args, "z_start", None)
    z_end = getattr(args, "z_end", None)
    if (z_start is None) != (z_end is None):
        raise DistdrgnError("give --z-start and --z-end together")
    if zdim == 0:
        if args.z is not None or args.zfile is not None or z_start is not None:
            raise DistdrgnError("the model is homogeneous (zdim = 0): do not give -z, --z-start or --zfile")
        return None
    if sum(x is not None for x in (args.z, args.zfile, z_start)) != 1:
        raise DistdrgnError(f"give the latents with exactly one of -z, --z-start/--z-end or --zfile (the model has zdim={zdim})")
    if z_start is not None:
        from distdrgn.cryodrgn_run import trajectory

        z = trajectory(z_start, z_end, args.n)
        source = "--z-start"
    elif args.z is not None:
        z = np.asarray(args.z, dtype=np.float32)
        source = "-z"
    else:
        path = Path(args.zfile)
        source = str(path)
        z = load_z(path)[0] if path.suffix == ".pkl" else read_text_array(path, "latents", np.float32, ndmin=2)
    if z.size == 0 or z.size % zdim or (z.ndim == 2 and z.shape[1] != zdim):
        raise DistdrgnError(f"{source}: latents must have {zdim} values per volume, got shape {z.shape}")
    z = z.reshape(-1, zdim)
    bad = np.flatnonzero(~np.isfinite(z).all(axis=1))
    if bad.size:  # the decoder would write NaN volumes without a word
        shown = ", ".join(map(str, bad[:10].tolist())) + (f", ... ({bad.size} in all)" if bad.size > 10 else "")
        raise DistdrgnError(f"{source}: non-finite (NaN or inf) latents in row(s) {shown} (numbered from 0)")
    return z


def check_output_dir(out: Path) -> None:
    """DistdrgnError (one line) unless ``out`` is, or can be created as, a writable folder.
    Nothing is created: a refused command leaves no empty folder behind."""
    import os

    from distdrgn.errors import DistdrgnError

    out = Path(os.path.abspath(out))
    if out.exists():
        if not out.is_dir():
            raise DistdrgnError(f"{out}: output directory exists as a file")
        if not os.access(out, os.W_OK | os.X_OK):
            raise DistdrgnError(f"{out}: output directory is not writable")
        return
    from distdrgn.output_paths import nearest_existing

    existing = nearest_existing(out.parent)
    if not existing.is_dir():
        raise DistdrgnError(f"{out}: cannot create the output directory: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DistdrgnError(f"{out}: cannot create the output directory: {existing} is not writable")


def check_options(args, train_D: int) -> None:
    """DistdrgnError for a volume box, crop or low-pass that eval_volumes would refuse only
    after creating the output directory."""
    from distdrgn.errors import DistdrgnError

    if args.D is not None and (args.D % 2 or args.D < 4):
        raise DistdrgnError(f"-D {args.D}: the volume box must be even and >= 4")
    D = train_D if args.D is None else args.D
    if args.crop is not None and (args.crop <= 0 or args.crop % 2 or args.crop > D):
        raise DistdrgnError(f"--crop {args.crop} must be even, positive and <= the volume box {D}")
    if args.low_pass is not None and args.low_pass <= 0:
        raise DistdrgnError(f"--low-pass {args.low_pass} must be a positive resolution in Angstrom")


def main(args) -> int:
    from tqdm import tqdm

    from distdrgn.volumes import eval_volumes, load_model

    check_output_dir(Path(args.outdir))
    trained = load_model(args.run_dir, epoch=args.epoch, config=getattr(args, "config", None))
    zs = read_latents(args, trained.zdim)
    check_options(args, trained.D)
    n = 1 if zs is None else len(zs)
    start = args.vol_start_index
    if start is None:
        start = 1 if args.z_start is not None else 0
    with tqdm(total=n, desc="volumes", unit="vol") as bar:
        paths = eval_volumes(trained, zs, args.outdir, D=args.D, apix=args.apix, flip=args.flip,
                             device=args.device, progress=bar, prefix=args.prefix, start_index=start,
                             invert=args.invert, low_pass=args.low_pass, crop=args.crop)
    print(f"wrote {len(paths)} volume(s) to {args.outdir} (weights epoch {trained.epoch})")
    return 0
