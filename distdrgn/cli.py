"""The ``distdrgn`` command: a thin dispatcher over :mod:`distdrgn.commands`.

Each subcommand lives in ``distdrgn/commands/<name>.py`` and defines ``add_args(parser)``
and ``main(args)``; the modules are imported only when their command runs, so
``distdrgn --help`` stays fast (no torch import).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from distdrgn import __version__
from distdrgn.errors import DistdrgnError, Stopped

# command name -> (module in distdrgn.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("simulate", "simulate a heterogeneous dataset with ground truth"),
    "parse-poses": ("parse_poses", "parse poses from a RELION .star or cryoSPARC .cs into poses.pkl"),
    "parse-ctf": ("parse_ctf", "parse CTF parameters from a .star or .cs into ctf.pkl"),
    "ingest": ("ingest", "convert particle stacks, poses and CTF into a Zarr particle store"),
    "store": ("store", "inspect, verify or export a particle store"),
    "train": ("train", "train a cryoDRGN VAE (or homogeneous model) from a config file"),
    "abinit": ("abinit", "reconstruct with unknown poses: hierarchical pose search, then pose refinement"),
    "config": ("config", "print a packaged training config (tiny, default, large) with its comments"),
    "eval-vol": ("eval_vol", "evaluate volumes from a trained model at given latents"),
    "encode": ("encode", "compute latents for the particles of a store with a trained model"),
    "analyze": ("analyze", "PCA, k-means and representative volumes of a trained run"),
    "graph-traversal": ("graph_traversal", "shortest path between particles on a kNN graph of the latents"),
    "pc-traversal": ("pc_traversal", "latent points along principal components"),
    "direct-traversal": ("direct_traversal", "latent points on straight lines between anchors"),
    "select": ("select", "select a particle subset (k-means labels, z-norm, UMAP polygon) as IND.pkl"),
    "concat-pkls": ("concat_pkls", "concatenate index, poses, CTF or z pickles row-wise"),
    "filter-pkl": ("filter_pkl", "keep the rows of a poses, CTF, z or index pickle given by an IND.pkl"),
    "view-header": ("view_header", "print the header of an .mrc/.mrcs, .star, .cs or particle store"),
    "filter": ("filter", "interactive lasso selection of particles in a latent-space plot"),
    "backproject": ("backproject", "voxel back-projection of a store (with half-maps)"),
    "fsc": ("fsc", "Fourier shell correlation between two volumes"),
    "gen-mask": ("gen_mask", "soft mask of a volume: threshold, dilation, cosine edge"),
    "flip-hand": ("flip_hand", "invert the handedness of a volume (mirror along z)"),
    "downsample-vol": ("downsample_vol", "Fourier-crop a volume to a smaller box (voxel size scaled)"),
    "dashboard": ("dashboard", "explore a trained run in the browser: scatter, lasso selection, volumes, trajectories"),
    "analyze-landscape": ("analyze_landscape", "volumes at many k-means centres: mask, PCA and clustering of volume space"),
    "bench": ("bench", "run a throughput benchmark (train, loader, knn) from benchmarks/"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distdrgn",
        description="Heterogeneous cryo-EM reconstruction at scale (cryoDRGN's science, distributed).",
    )
    parser.add_argument("--version", action="version", version=f"distdrgn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only == name:  # only the command being run needs its module (and its imports)
            mod = importlib.import_module(f"distdrgn.commands.{module}")
            mod.add_args(p)
            p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=name if name in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        result = args._main(args)
    except Stopped as exc:  # a checkpoint was written: the scheduler may requeue the same command
        print(exc, file=sys.stderr)
        return exc.exit_code
    except DistdrgnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)  # on its own line, not after a progress bar
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
