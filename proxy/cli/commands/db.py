"""``mirrorgate db upgrade|status``: the database schema (Alembic migrations)."""

from __future__ import annotations

import argparse
from typing import Any

from proxy.cli.commands._storage import add_db_args, open_db
from proxy.core.errors import ConfigError
from storage.errors import StorageError
from storage.migrate import schema_status, upgrade


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "db",
        help="database schema: upgrade, status",
        description="Manage the mirrorgate database schema (Alembic migrations shipped "
        "in the package).",
    )
    sub = parser.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = sub.add_parser("upgrade", help="upgrade the schema to this version's (creates it)")
    add_db_args(up)
    up.add_argument("--revision", default="head", help="target revision (default head)")
    st = sub.add_parser("status", help="print the schema state; exit 1 unless current")
    add_db_args(st)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    db = open_db(args, migrate=None)
    try:
        if args.db_command == "upgrade":
            status = upgrade(db, args.revision)
            print(f"{db.display_url}: {status.message}")
            return 0
        status = schema_status(db)
        print(f"{db.display_url}: {status.message}")
        return 0 if status.state == "current" else 1
    except StorageError as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        db.dispose()
