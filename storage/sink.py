"""The recorder interface the proxy hands pairs to, and an in-memory implementation.

``submit`` never blocks and never raises: it returns False when the record was dropped
(buffer full), and the implementation counts the drop. The live path calls it after the
champion's response is on its way.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol, runtime_checkable

from gates.records import PairRecord


@runtime_checkable
class PairSink(Protocol):
    def submit(self, record: PairRecord) -> bool: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None:
        """Flush what was accepted, then release resources."""
        ...


class MemorySink:
    """Bounded in-memory sink: for tests, the demo's fast mode and storage-less runs."""

    def __init__(self, maxlen: int = 100_000) -> None:
        self.records: deque[PairRecord] = deque()
        self.maxlen = maxlen
        self.dropped = 0
        self.closed = False

    def submit(self, record: PairRecord) -> bool:
        if len(self.records) >= self.maxlen:
            self.dropped += 1
            return False
        self.records.append(record)
        return True

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        self.closed = True
