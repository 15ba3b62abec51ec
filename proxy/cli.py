"""The ``mirrorgate`` console script: discovers subcommands in ``proxy.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

import proxy.commands
from proxy import __version__
from proxy.errors import MirrorgateError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirrorgate",
        description="Shadow-mode online regression proxy for ML models.",
    )
    parser.add_argument("--version", action="version", version=f"mirrorgate {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(proxy.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"proxy.commands.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args))
    except MirrorgateError as exc:
        print(f"mirrorgate: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
