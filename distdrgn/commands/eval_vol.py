"""``distdrgn eval-vol RUN_DIR (-z Z... | --zfile FILE) -o DIR``: volumes from a trained model."""

from __future__ import annotations

from pathlib import Path


def add_args(parser) -> None:
    parser.add_argument("run_dir", help="training run directory (or a weights .pkl file)")
    parser.add_argument("--epoch", type=int, default=None, help="use weights.EPOCH.pkl (default: weights.pkl, else the latest)")
    parser.add_argument("-z", type=float, nargs="+", default=None, metavar="Z",
                        help="latent value(s): zdim numbers per volume, several volumes as consecutive groups")
    parser.add_argument("--zfile", default=None, help="text file of latents, one volume per row (zdim columns), or a z.pkl")
    parser.add_argument("--apix", type=float, default=None, help="voxel size in A (default: the store's pixel size)")
    parser.add_argument("-D", "--box", dest="D", type=int, default=None, help="volume box size (even; default: the training box)")
    parser.add_argument("--flip", action="store_true", help="mirror the volumes along z (invert the handedness)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("-o", "--outdir", required=True, help="output directory for vol_000.mrc, ...")


def read_latents(args, zdim: int):
    import numpy as np

    from distdrgn.checkpoint import load_z
    from distdrgn.errors import DistdrgnError
    from distdrgn.formats.ind import read_text_array

    if zdim == 0:
        if args.z is not None or args.zfile is not None:
            raise DistdrgnError("the model is homogeneous (zdim = 0): do not give -z or --zfile")
        return None
    if (args.z is None) == (args.zfile is None):
        raise DistdrgnError(f"give the latents with exactly one of -z or --zfile (the model has zdim={zdim})")
    if args.z is not None:
        z = np.asarray(args.z, dtype=np.float32)
        source = "-z"
    else:
        path = Path(args.zfile)
        source = str(path)
        z = load_z(path)[0] if path.suffix == ".pkl" else read_text_array(path, "latents", np.float32, ndmin=2)
    if z.size == 0 or z.size % zdim or (z.ndim == 2 and z.shape[1] != zdim):
        raise DistdrgnError(f"{source}: latents must have {zdim} values per volume, got shape {z.shape}")
    return z.reshape(-1, zdim)


def main(args) -> int:
    from tqdm import tqdm

    from distdrgn.volumes import eval_volumes, load_model

    trained = load_model(args.run_dir, epoch=args.epoch)
    zs = read_latents(args, trained.zdim)
    n = 1 if zs is None else len(zs)
    with tqdm(total=n, desc="volumes", unit="vol") as bar:
        paths = eval_volumes(trained, zs, args.outdir, D=args.D, apix=args.apix, flip=args.flip,
                             device=args.device, progress=bar)
    print(f"wrote {len(paths)} volume(s) to {args.outdir} (weights epoch {trained.epoch})")
    return 0
