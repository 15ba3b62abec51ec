"""Shared by the storage commands: which database, opened how, errors mapped to exit 2.

The database URL comes from ``--url``, else the ``storage.url`` of ``--config``, else
``MIRRORGATE_STORAGE__URL``, else the default (``sqlite:///mirrorgate.sqlite`` in the
working directory).
"""

from __future__ import annotations

import argparse
import os
from typing import Literal

from proxy.core.config import load_config
from proxy.core.errors import ConfigError
from storage.db import Database
from storage.errors import StorageError
from storage.migrate import ensure_schema
from storage.settings import StorageSettings


def add_db_args(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--config", metavar="FILE", help="take storage.url from this config")
    where.add_argument(
        "--url", metavar="URL", help="database URL (sqlite:///PATH, postgresql://...)"
    )


def storage_settings(args: argparse.Namespace) -> StorageSettings:
    if getattr(args, "url", None):
        return StorageSettings(url=args.url)
    if getattr(args, "config", None):
        return load_config(args.config).storage
    env = os.environ.get("MIRRORGATE_STORAGE__URL")
    return StorageSettings(url=env) if env else StorageSettings()


def open_db(args: argparse.Namespace, *, migrate: Literal["upgrade", "refuse"] | None) -> Database:
    """Open the database; ``migrate`` None: no schema check (the db command itself)."""
    settings = storage_settings(args)
    try:
        db = Database(settings.url)
        if migrate is not None:
            ensure_schema(db, migrate)
    except StorageError as exc:
        raise ConfigError(str(exc)) from exc
    return db
