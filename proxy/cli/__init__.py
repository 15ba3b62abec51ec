"""The ``mirrorgate`` command line: the entry point, its subcommands and their helpers."""
