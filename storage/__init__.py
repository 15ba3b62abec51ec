"""mirrorgate storage: the only package that knows SQL (SQLAlchemy 2, Alembic).

Entry points: ``migrate.open_database(settings)``, ``store.Store(db)``,
``recorder.SqlRecorder(db, rollout_id, settings, registry=...)``, ``files.read_pairs``,
``files.read_labels``, ``files.write_pairs``. See docs/storage.md.
"""
