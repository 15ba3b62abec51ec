"""mirrorgate storage: the only package that knows SQL (SQLAlchemy 2, Alembic)."""
