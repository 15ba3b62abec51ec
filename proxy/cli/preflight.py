"""Checks of a loaded config that need the outside world, run before any side effect.

``mirrorgate serve`` calls :func:`check` before it migrates a database or binds a socket,
and ``mirrorgate config validate`` runs the same checks: model files exist and are files,
URLs are absolute http(s) URLs, the database URL parses and names a supported driver (and
a SQLite file's folder exists), the event loop asked for is installed, and the CPUs asked
for are ones this process may use. Every problem is reported at once, each with its field
path (``models.candidate.path: no such file: ...``).
"""

from __future__ import annotations

import importlib.util
import os
from urllib.parse import urlsplit

from proxy.core import affinity
from proxy.core.config import BackendSettings, MirrorgateConfig
from proxy.core.errors import ConfigError


def _backend(prefix: str, backend: BackendSettings) -> list[str]:
    problems = []
    runtime = {"onnx": ("onnxruntime", "onnx"), "torch": ("torch", "torch")}.get(backend.kind)
    if runtime is not None and importlib.util.find_spec(runtime[0]) is None:
        problems.append(
            f"{prefix}.kind: {backend.kind} needs {runtime[0]}, which is not installed: "
            f"pip install 'mirrorgate[{runtime[1]}]'"
        )
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
    # storage's own URL rules (imported here so `mirrorgate --help` never loads SQLAlchemy).
    from storage.db import normalize_url
    from storage.errors import StorageError

    try:
        parsed = normalize_url(url)
    except StorageError as exc:
        return [f"storage.url: {exc}"]
    if parsed.get_backend_name() == "postgresql":
        driver = parsed.get_driver_name()
        if importlib.util.find_spec(driver) is None:
            return [
                f"storage.url: PostgreSQL needs {driver}, which is not installed: "
                "pip install 'mirrorgate[postgres]'"
            ]
    return []


def problems(config: MirrorgateConfig) -> list[str]:
    found = _backend("models.champion", config.models.champion)
    if config.models.candidate is not None:
        found += _backend("models.candidate", config.models.candidate)
    drift = config.gates.drift.input
    if drift.enabled and drift.reference == "file" and drift.reference_path:
        if not os.path.isfile(drift.reference_path):
            found.append(f"gates.drift.input.reference_path: no such file: {drift.reference_path}")
    found += _database(config.storage.url)
    if config.server.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        found.append("server.event_loop: uvloop is not installed: pip install 'mirrorgate[uvloop]'")
    usable = affinity.allowed()
    found += affinity.problems(config.server.cpus, "server.cpus", usable)
    found += affinity.problems(config.shadow.worker_cpus, "shadow.worker_cpus", usable)
    return found


def check(config: MirrorgateConfig, source: str = "the configuration") -> None:
    """Raise ConfigError listing every problem, before anything is migrated or bound."""
    found = problems(config)
    if found:
        raise ConfigError(f"invalid configuration ({source}):\n  " + "\n  ".join(found))
