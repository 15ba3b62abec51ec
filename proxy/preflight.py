"""Checks of a loaded config that need the outside world, run before any side effect.

``mirrorgate serve`` calls :func:`check` before it migrates a database or binds a socket,
and ``mirrorgate config validate`` runs the same checks: model files exist and are files,
URLs are absolute http(s) URLs, the database URL parses and names a supported driver (and
a SQLite file's folder exists). Every problem is reported at once, each with its field
path (``models.candidate.path: no such file: ...``).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from proxy.config import BackendSettings, MirrorgateConfig
from proxy.errors import ConfigError


def _backend(prefix: str, backend: BackendSettings) -> list[str]:
    problems = []
    if backend.path and backend.kind in ("onnx", "torch"):
        if not os.path.exists(backend.path):
            problems.append(f"{prefix}.path: no such file: {backend.path}")
        elif not os.path.isfile(backend.path):
            problems.append(f"{prefix}.path: not a file: {backend.path}")
        elif not os.access(backend.path, os.R_OK):
            problems.append(f"{prefix}.path: not readable: {backend.path}")
    if backend.url and backend.kind == "http":
        parts = urlsplit(backend.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(
                f"{prefix}.url: not an absolute http(s) URL with a host: {backend.url!r}"
            )
        else:
            try:
                _ = parts.port
            except ValueError:
                problems.append(f"{prefix}.url: bad port in {backend.url!r}")
    return problems


def _database(url: str) -> list[str]:
    # SQLAlchemy's own URL parser, imported here so `mirrorgate --help` never loads it.
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        return [f"storage.url: not a database URL: {exc}"]
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        path = parsed.database
        if path and path != ":memory:":
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                return [f"storage.url: folder of the SQLite file does not exist: {folder}"]
        return []
    if backend == "postgresql":
        driver = parsed.get_driver_name()
        if driver not in ("psycopg", "psycopg2"):
            return [f"storage.url: PostgreSQL driver {driver!r}: use postgresql+psycopg://"]
        return []
    return [f"storage.url: unsupported database {backend!r} (sqlite or postgresql)"]


def problems(config: MirrorgateConfig) -> list[str]:
    found = _backend("models.champion", config.models.champion)
    if config.models.candidate is not None:
        found += _backend("models.candidate", config.models.candidate)
    drift = config.gates.drift.input
    if drift.enabled and drift.reference == "file" and drift.reference_path:
        if not os.path.isfile(drift.reference_path):
            found.append(f"gates.drift.input.reference_path: no such file: {drift.reference_path}")
    found += _database(config.storage.url)
    return found


def check(config: MirrorgateConfig, source: str = "the configuration") -> None:
    """Raise ConfigError listing every problem, before anything is migrated or bound."""
    found = problems(config)
    if found:
        raise ConfigError(f"invalid configuration ({source}):\n  " + "\n  ".join(found))
