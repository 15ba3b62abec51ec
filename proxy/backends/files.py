"""Model files: existence checks and content digests for :class:`ModelIdentity`."""

from __future__ import annotations

import hashlib
from pathlib import Path

from proxy.core.errors import ConfigError

_CHUNK = 1 << 20


def require_file(path: str, *, what: str) -> Path:
    """``path`` as a Path, or ConfigError if it is not a readable regular file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {path!r} does not exist or is not a file")
    return p


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in chunks: model files can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
