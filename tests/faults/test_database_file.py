"""The SQLite file under a running recorder: deleted, replaced, its journal choice.

Real SQLite files, the real recorder. A deleted or replaced file must never count pairs
as written (SQLite keeps writing to the unlinked inode and every commit succeeds);
the default journal keeps no memory-mapped ``-shm`` index (SIGBUS when that file is
damaged or the disk is full), so there is no ``-shm`` file at all.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from storage.db import Database
from storage.migrate import open_database
from storage.recorder import SqlRecorder
from storage.settings import StorageSettings
from storage.store import Store
from tests.storage.factories import CANDIDATE, CHAMPION, make_record


def _sample(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


async def _recorder(path: Path) -> tuple[SqlRecorder, CollectorRegistry, Database]:
    settings = StorageSettings(url=f"sqlite:///{path}", flush_interval_ms=10)
    db = open_database(settings)
    rollout = Store(db).create_rollout(CHAMPION, CANDIDATE)
    reg = CollectorRegistry()
    rec = SqlRecorder(db, rollout.id, settings, registry=reg)
    await rec.start()
    return rec, reg, db


@pytest.mark.parametrize("how", ["deleted", "replaced", "folder_deleted"])
async def test_a_vanished_database_file_is_reported_never_counted_as_written(
    tmp_path: Path, how: str
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "mg.sqlite"
    rec, reg, db = await _recorder(path)
    try:
        for i in range(20):
            assert rec.submit(make_record(i))
        assert await rec.flush(60)
        assert _sample(reg, "mirrorgate_recorder_written_total") == 20
        assert _sample(reg, "mirrorgate_recorder_database_file_ok") == 1
        assert rec.file_problem is None

        if how == "deleted":
            path.unlink()
        elif how == "replaced":
            other = tmp_path / "other.sqlite"
            shutil.copy(path, other)
            os.replace(other, path)  # same path, another inode
        else:
            shutil.rmtree(folder)
        for i in range(20, 50):
            assert rec.submit(make_record(i))
        assert await rec.flush(60)
        assert _sample(reg, "mirrorgate_recorder_written_total") == 20
        assert _sample(reg, "mirrorgate_recorder_dropped_total", reason="db_file_gone") == 30
        assert _sample(reg, "mirrorgate_recorder_database_file_ok") == 0
        assert rec.file_problem is not None and str(path) in rec.file_problem
        assert ("replaced" if how == "replaced" else "deleted") in rec.file_problem
    finally:
        await rec.aclose()
        db.dispose()


def test_default_journal_has_no_memory_mapped_index(tmp_path: Path) -> None:
    path = tmp_path / "mg.sqlite"
    db = open_database(StorageSettings(url=f"sqlite:///{path}"))
    try:
        Store(db).create_rollout(CHAMPION, CANDIDATE)
        with db.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "truncate"
        assert not Path(f"{path}-shm").exists()
    finally:
        db.dispose()
    # wal stays available on request (and really is WAL)
    wal = open_database(StorageSettings(url=f"sqlite:///{path}", sqlite_journal="wal"))
    try:
        with wal.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    finally:
        wal.dispose()
