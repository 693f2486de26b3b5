"""``distdrgn bench train|loader|knn|kernels [OPTIONS]``: run a throughput benchmark of benchmarks/.

The benchmarks are scripts in the source checkout (they print one table and write JSON);
this command runs the named one in a fresh interpreter with the options that follow, e.g.
``distdrgn bench train --D 128 --batch-size 64`` or ``distdrgn bench loader --help``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from distdrgn.errors import DistdrgnError

SCRIPTS = {
    "train": ("train_throughput.py", "training-step images/s per device, fused kernels vs PyTorch, vs the roofline"),
    "loader": ("loader_throughput.py", "images/s the store loader sustains from local disk, per worker count"),
    "knn": ("knn.py", "kNN graph build time and recall per backend at 100k-1M latents"),
    "kernels": ("kernel_resources.py", "registers, spills and tensor-core use of the kernels compiled for sm_90 (no GPU needed)"),
}


def benchmarks_dir() -> Path:
    """benchmarks/ of the checkout this package runs from (an editable or source install)."""
    return Path(__file__).resolve().parents[2] / "benchmarks"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(SCRIPTS),
                        help="; ".join(f"{k}: {v[1]}" for k, v in SCRIPTS.items()))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="passed to the script (see its --help)")


def main(args: argparse.Namespace) -> int:
    script = benchmarks_dir() / SCRIPTS[args.name][0]
    if not script.is_file():
        raise DistdrgnError(f"{script} not found: `distdrgn bench` runs the scripts of a source checkout "
                            f"(git clone the repository and pip install -e it)")
    return subprocess.call([sys.executable, str(script), *args.options])
