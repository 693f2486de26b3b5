"""``distdrgn abinit CONFIG.yaml [section.key=value ...]``: same program as ``python -m distdrgn.abinit``."""

from __future__ import annotations


def add_args(parser) -> None:
    from distdrgn.train import add_args as train_add_args

    train_add_args(parser)


def main(args) -> int:
    from distdrgn.train import run_from_args

    out_dir = run_from_args(args, search=True)
    print(f"run directory: {out_dir}")
    return 0
