"""CLI subcommands, one module each.

Every module here defines ``register(subparsers)`` that adds its parser and sets
``func=run`` where ``run(args) -> int`` is the exit code. ``proxy.cli.main`` discovers them.
"""
