"""Bounded zlib decoding: request bodies (proxy/dataplane/limits.py) and upstream answers
(proxy/backends/http.py) are inflated a step at a time, so a decompression bomb costs at
most its limit in memory, wherever it comes from."""

from __future__ import annotations

import zlib

# Output produced per decompression step: what a bomb can allocate past the limit.
DECODE_STEP = 1 << 16
GZIP_WBITS = 16 + zlib.MAX_WBITS


class TooLarge(Exception):
    """The stream decodes to more than the limit (the caller says whose limit)."""


def deflate_wbits(raw: bytes) -> int:
    """RFC 1950 (zlib-wrapped) as specified, raw RFC 1951 as many senders send it:
    aiohttp's choice, from the first byte."""
    return zlib.MAX_WBITS if raw and raw[0] & 0x0F == 8 else -zlib.MAX_WBITS


def inflate(raw: bytes, wbits: int, limit: int, stop: int | None = None) -> bytes:
    """gzip (every member, as aiohttp reads them) or deflate, never more than ``limit``
    bytes of output (:class:`TooLarge` past it). ``stop``: only the first ``stop``
    bytes are wanted (the rest is not decoded). A stream that is not that coding raises
    ``zlib.error``."""
    out: list[bytes] = []
    size = 0
    data = raw
    while True:
        inflater = zlib.decompressobj(wbits)
        pending = data
        while not inflater.eof:
            # (With the input all taken, zlib may still hold output: ask until none.)
            chunk = inflater.decompress(pending, DECODE_STEP)
            pending = inflater.unconsumed_tail
            if not chunk and not pending:
                break
            size += len(chunk)
            out.append(chunk)
            if stop is not None and size >= stop:
                return b"".join(out)[:stop]
            if size > limit:
                raise TooLarge(limit)
        if not inflater.eof:
            raise zlib.error("incomplete or truncated stream")
        data = inflater.unused_data
        if not data:
            return b"".join(out)
        if wbits < 16:  # deflate is one stream: bytes after its end are not deflate
            raise zlib.error("bytes after the end of the stream")
