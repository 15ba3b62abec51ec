"""One error hierarchy carrying its HTTP status (MLServer's ``errors.py`` shape).

Everything the server raises on purpose is a :class:`MirrorgateError`; the app maps it to
``{"error": message}`` with ``status`` in exactly one place. Foreign errors (aiohttp,
onnxruntime, SQLAlchemy, torch) are converted where they enter, ``raise ... from exc``.
"""

from __future__ import annotations


class MirrorgateError(Exception):
    status: int = 500
    headers: dict[str, str] = {}  # read-only class default; instances copy theirs

    def __init__(
        self, message: str, *, status: int | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if headers is not None:
            self.headers = dict(headers)


class BadRequest(MirrorgateError):
    """Malformed request: JSON, datatype, shape, binary header, unknown input name."""

    status = 400


class Unauthorized(MirrorgateError):
    """401 with ``WWW-Authenticate: Bearer`` (RFC 6750 section 3)."""

    status = 401
    headers = {"WWW-Authenticate": 'Bearer realm="mirrorgate"'}


class NotFound(MirrorgateError):
    """Unknown model, pinned case, rollout."""

    status = 404


class Conflict(MirrorgateError):
    status = 409


class PayloadTooLarge(MirrorgateError):
    status = 413


class NotReady(MirrorgateError):
    status = 503


class BackendError(MirrorgateError):
    """A model backend failed to produce an output (runtime error, bad upstream reply)."""

    status = 502


class BackendTimeout(BackendError):
    status = 504


class ConfigError(MirrorgateError):
    """Invalid configuration; the message names the key's path."""

    status = 500
