"""The ``mirrorgate`` console script: discovers subcommands in ``proxy.cli.commands``.

Every module in ``proxy.cli.commands`` defines ``register(subparsers)``. Importing them all
would pull in aiohttp, numpy, scipy and SQLAlchemy for every invocation (2 s for
``--help``), so the commands listed in ``SUMMARIES`` are registered from that table
(name and one-line help) and their module is imported only when the command line names
them. A module missing from the table is imported eagerly: correct, only slower.
tests/proxy/cli/test_cli.py checks the table against the modules' own help texts.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

import proxy.cli.commands
from proxy import __version__
from proxy.core.errors import MirrorgateError

# module -> (command name, one-line help), as the module's register() says it.
SUMMARIES: dict[str, tuple[str, str]] = {
    "config": (
        "config",
        "print the config schema, defaults or reference; validate a config file",
    ),
    "db": ("db", "database schema: upgrade, status"),
    "demo": ("demo", "run the demo: two rollouts of real models through the real proxy"),
    "export": ("export", "export pairs (JSON Lines) or the pinned suite"),
    "import_": ("import", "import pairs or labels (JSON Lines)"),
    "pinned": ("pinned", "list, show and triage pinned failure cases"),
    "replay": ("replay", "run the gates and decision engine over a recorded paired-record file"),
    "report": ("report", "write a rollout's validation pack (report.html + report.json)"),
    "rollouts": ("rollouts", "list the rollouts in the database"),
    "serve": ("serve", "run the proxy"),
    "signoff": ("signoff", "record a reviewer's approve/reject against a rollout's report"),
    "suite": ("suite", "run or curate a pinned never-regress suite"),
}


def command_modules() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules(proxy.cli.commands.__path__) if m.name[0] != "_"
    )


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the commands it names are imported (fully built)."""
    parser = argparse.ArgumentParser(
        prog="mirrorgate",
        description="Shadow-mode online regression proxy for ML models.",
    )
    parser.add_argument("--version", action="version", version=f"mirrorgate {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show library INFO lines (Alembic migrations, ...)",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bars and only warnings in the log",
    )
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines as text or one JSON object per line (default text)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    named = None if argv is None else set(argv)
    for module_name in command_modules():
        summary = SUMMARIES.get(module_name)
        if summary is not None and named is not None and summary[0] not in named:
            sub.add_parser(summary[0], help=summary[1])
            continue
        module = importlib.import_module(f"proxy.cli.commands.{module_name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message (and exc when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(args: argparse.Namespace) -> None:
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    if args.quiet:
        level = max(level, logging.WARNING)
    handler = logging.StreamHandler()
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    if not args.verbose:
        # Alembic logs every migration step at INFO ("Context impl", "Running upgrade").
        logging.getLogger("alembic").setLevel(max(level, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    configure_logging(args)
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
