"""Alembic migrations, shipped inside the package (``storage.migrate`` locates them)."""
