"""The SQLite engine's per-connection settings (storage/db.py)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from storage.db import SQLITE_CACHE_KIB, Database


def test_every_sqlite_connection_caps_its_page_cache(tmp_path: Path) -> None:
    # Each pooled connection has its own page cache: the bound must hold on all of them,
    # not only the first (the 200k soak grew by ~3x the database's size at 32 MB each).
    db = Database(f"sqlite:///{tmp_path / 'x.sqlite'}")
    try:
        with db.engine.connect() as a, db.engine.connect() as b:
            for conn in (a, b):
                assert conn.execute(text("PRAGMA cache_size")).scalar() == -SQLITE_CACHE_KIB
        assert SQLITE_CACHE_KIB <= 2048
    finally:
        db.dispose()
