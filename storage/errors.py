"""Errors the storage layer raises on purpose (``storage`` never imports ``proxy``).

The proxy maps them at its boundary: a :class:`SchemaError` at start-up is a
configuration problem (exit code 2 with the message), a :class:`StorageError` from a
control-plane read is a 503.
"""

from __future__ import annotations


class StorageError(Exception):
    """The database refused or could not do what was asked; the message says why."""


class SchemaError(StorageError):
    """The database schema is behind, ahead of, or foreign to this version of mirrorgate."""


class NotFoundError(StorageError):
    """A rollout, pinned case or other row named by the caller does not exist."""


class InvalidError(StorageError):
    """The caller's arguments are invalid (a missing reason, an unknown status...)."""
