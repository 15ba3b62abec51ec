"""Frames on the hand-off socket between a live process and the shadow worker.

Every frame is ``length (u32, big-endian) | kind (1 byte) | payload``. Live -> worker:
``J`` jobs (a pickled ``(job, other)`` pair of :mod:`proxy.dataplane.mirror` objects: the request's
inputs and the served side's raw outcome). Worker -> live: ``A`` acks (cumulative jobs and
payload bytes taken in since the connection opened, two u64) and ``S`` state (JSON: canary
weight, stage, candidate stopped, worker ready, control-plane URL).

The socket lives in a private (0700) directory of the serving user: pickle is safe there
because only that user's processes can connect.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

HEADER = struct.Struct(">IB")
ACK = struct.Struct(">QQ")
JOB = ord("J")
ACK_KIND = ord("A")
STATE = ord("S")


def frame(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), kind) + payload


class FrameReader:
    """Splits a byte stream into ``(kind, payload)`` frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        self._buf += data
        offset = 0
        size = len(self._buf)
        while size - offset >= HEADER.size:
            length, kind = HEADER.unpack_from(self._buf, offset)
            end = offset + HEADER.size + length
            if end > size:
                break
            yield kind, bytes(self._buf[offset + HEADER.size : end])
            offset = end
        if offset:
            del self._buf[:offset]
