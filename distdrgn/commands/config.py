"""``distdrgn config [NAME] [section.key=value ...]``: print a training config.

Without overrides it prints the packaged file itself, comments included (``default``
documents every key); with overrides, the resolved config as ``train`` would use it.
"""

from __future__ import annotations

import sys


def add_args(parser) -> None:
    from distdrgn.config import packaged_configs

    parser.add_argument("name", nargs="?", default="default",
                        help=f"a packaged config ({', '.join(packaged_configs())}) or a YAML file (default: default)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="print the resolved config with these overrides applied")
    parser.epilog = "e.g. distdrgn config large > my.yaml; distdrgn train my.yaml data.store=S output.dir=R"


def main(args) -> int:
    from distdrgn.config import config_path, dump_config, load_config, split_config_arguments

    name, overrides = split_config_arguments([args.name, *args.overrides])
    if overrides:
        sys.stdout.write(dump_config(load_config(name, overrides)))
    else:
        path = config_path(name)
        load_config(path)  # a file that does not load is reported, not printed
        sys.stdout.write(path.read_text())
    return 0
