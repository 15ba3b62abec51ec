"""Capture policy ``failures``: hold recent inputs in memory until the pair is judged.

Whether a pair is a failure is often known only later: a disagreement needs both
outputs (known at submit), a wrong label needs the label (seconds to days later), a
harvest rule may decide on its own. So under ``failures`` the recorder writes every
pair with its inputs digest only, and keeps its input tensors here, bounded by count
and bytes, oldest evicted first. When the pair becomes a failure — at submit by the
failure rule, when its label joins and the rule says wrong, or when the harvest step
calls ``SqlRecorder.mark_failure(id)`` — the tensors are taken out of this cache and
written into the pair's row. A failure judged after its inputs were evicted keeps only
the digest: the bound is what keeps this from becoming a second, unbounded store.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from gates.records import PairRecord
from storage.codec import inputs_nbytes

Inputs = dict[str, np.ndarray]
FailureRule = Callable[[PairRecord], bool]


class CaptureCache:
    """Thread-safe bounded LRU: record id -> input tensors."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[Inputs, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evicted = 0

    def put(self, record_id: str, inputs: Inputs) -> None:
        size = inputs_nbytes(inputs)
        if self.max_entries == 0 or size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(record_id, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[record_id] = (inputs, size)
            self._bytes += size
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped
                self.evicted += 1

    def get(self, record_id: str) -> Inputs | None:
        with self._lock:
            item = self._items.get(record_id)
            return None if item is None else item[0]

    def take(self, record_id: str) -> Inputs | None:
        """Remove and return (a failure's inputs go to the database exactly once)."""
        with self._lock:
            item = self._items.pop(record_id, None)
            if item is None:
                return None
            self._bytes -= item[1]
            return item[0]

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes


# Up to this many classes the top class is found in Python (see ``_argmax``).
_SMALL = 64


def _argmax(values: list[Any]) -> int:
    """``np.argmax`` of a short list: the first maximum, or the first NaN if any."""
    best, top = 0, values[0]
    if top != top:
        return 0
    for i in range(1, len(values)):
        value = values[i]
        if value != value:
            return i
        if value > top:
            best, top = i, value
    return best


def _top(output: np.ndarray | None) -> int | None:
    if output is None:
        return None
    arr = np.asarray(output)
    if arr.ndim != 1 or arr.size < 2 or arr.dtype.kind not in "biuf":
        return None
    if arr.size <= _SMALL:
        # ndarray.argmax releases the GIL whatever the size: on the shadow worker's
        # event loop (recorder.submit runs this twice per pair) each call handed the GIL
        # to the recorder's or the gates' thread and waited to get it back (a futex
        # round trip, up to the 5 ms switch interval while that thread ran). Issue 11.
        return _argmax(arr.tolist())
    return int(arr.argmax())  # the method: no dispatch per pair for a tiny array


def default_failure_rule(record: PairRecord) -> bool:
    """A pair is a failure when either model errored, when the two classifiers' top
    classes differ, or when an integer label disagrees with either top class.

    Scalar (regression) outputs never count as disagreeing here: that needs a tolerance
    only the gates know; pass their rule (``SqlRecorder(failure_rule=...)``) instead.
    """
    if record.champion.error is not None or record.candidate.error is not None:
        return True
    a, b = _top(record.champion.output), _top(record.candidate.output)
    if a is not None and b is not None and a != b:
        return True
    label = record.label
    if isinstance(label, int) and not isinstance(label, bool):
        return (a is not None and a != label) or (b is not None and b != label)
    return False
