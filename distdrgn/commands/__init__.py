"""One module per ``distdrgn`` subcommand: ``add_args(parser)`` and ``main(args)``."""
