"""``SqlRecorder``: the bounded, batched writer the proxy hands pairs and labels to.

The live path calls ``submit(record)`` / ``submit_label(...)``: an append to a bounded
in-memory buffer, nothing else — no database, no lock held across I/O, never raises.
One writer thread drains the buffer: a batch is written when ``batch_size`` items wait
or ``flush_interval_ms`` has passed, in one transaction with bulk inserts (the
encoding of outputs and inputs happens on that thread too, not in ``submit``).

When the database is slow or down the failed batch is retried with doubling backoff
(``retry_initial_ms`` .. ``retry_max_ms``) while new records wait in the buffer; once
``buffer_size`` records wait, new ones are dropped and counted in
``mirrorgate_recorder_dropped_total{reason="buffer_full"}`` with a (rate-limited) log
line. A batch the database rejects for its content (a constraint, bad data) is written
row by row so one bad record costs only itself (``reason="rejected"``).

``aclose()`` stops accepting (``reason="closed"``), then writes everything accepted;
if the database stays down for ``close_timeout_s`` the rest is dropped and counted
(``reason="shutdown"``) so shutdown always ends.

Other drop reasons: ``encode`` (a record that cannot be serialized), ``error`` (a bug,
or a database error of a kind nobody foresaw: logged with its traceback, counted, the
writer keeps going), ``db_file_gone`` (SQLite: the database file was deleted or
replaced under the running process; see below).

A deleted or replaced SQLite file is the silent fault: the open connections keep
writing to the unlinked inode, every commit succeeds and nothing reaches the disk. The
writer remembers the file's (device, inode) at start and checks it after every commit:
once the path is missing or names another file, those rows and every later one are
dropped and counted as ``db_file_gone`` (never as written), the problem is logged
(rate-limited), ``mirrorgate_recorder_database_file_ok`` turns 0 and
``file_problem`` says why (``GET /v1/rollout``: ``storage``). Restarting the server
opens the file at the path again. Labels have their own counters
(``mirrorgate_recorder_labels_written_total``, ``..._labels_dropped_total{reason}``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import (
    DisconnectionError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout

from gates.records import Label, PairRecord
from storage import labels as label_join
from storage.capture import CaptureCache, FailureRule, default_failure_rule
from storage.codec import encode_inputs
from storage.db import Database, is_memory_sqlite
from storage.entities import LabelEntry
from storage.errors import InvalidError, NotFoundError
from storage.retention import purge
from storage.rows import REQUEST_ID, insert_pairs, record_to_params
from storage.schema import PAIRS, RolloutRow
from storage.settings import StorageSettings

log = logging.getLogger(__name__)

TRANSIENT = (OperationalError, InterfaceError, DisconnectionError, PoolTimeout)
DROP_REASONS = (
    "buffer_full",
    "closed",
    "shutdown",
    "rejected",
    "encode",
    "error",
    "db_file_gone",
)

_PAIR, _LABEL, _CAPTURE = 0, 1, 2
_YIELD_EVERY = 32
# A backlog (the database came back after an outage: a full buffer waits) is written
# batch after batch; back to back, the writer thread would hold the GIL and a core for
# seconds and the live loop's p99 rose 6x ("database back", docs/faults.md). Between two
# batches of a backlog the writer pauses this many times as long as the batch took: it
# takes at most 1 / (1 + ratio) of a core, and the backlog still drains.
_BACKLOG_PAUSE_RATIO = 1.0
_BACKLOG_PAUSE_MAX_S = 0.05
_Item = tuple[int, str, Any, bool]  # (kind, rollout id, payload, store inputs)


class _Throttled:
    """A log line at the first event, then at most one summary per interval."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last = -1e18
        self._suppressed = 0
        self._lock = threading.Lock()

    def __call__(self, level: int, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval_s:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last = self._suppressed, 0, now
        if suppressed:
            msg += " (%d similar events since the last line)"
            args = (*args, suppressed)
        log.log(level, msg, *args)


@dataclass(slots=True)
class _Batch:
    pairs: list[tuple[Any, ...]] = field(default_factory=list)
    labels: list[tuple[Any, ...]] = field(default_factory=list)
    captures: list[dict[str, Any]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pairs) + len(self.labels) + len(self.captures)

    def split(self) -> list[_Batch]:
        out = [_Batch(pairs=[p], ids=[p[REQUEST_ID]]) for p in self.pairs]
        out += [_Batch(labels=[lb], ids=[lb[0]]) for lb in self.labels]
        out += [_Batch(captures=[c]) for c in self.captures]
        return out


class SqlRecorder:
    """Implements ``storage.sink.PairSink`` on a database, plus labels and capture."""

    def __init__(
        self,
        db: Database,
        rollout_id: str,
        settings: StorageSettings,
        *,
        registry: CollectorRegistry | None = None,
        failure_rule: FailureRule | None = default_failure_rule,
        on_label_joined: Callable[[list[PairRecord]], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if is_memory_sqlite(db.url):
            # One shared connection cannot carry the writer's and the maintenance
            # thread's transactions at once.
            raise InvalidError("the recorder needs a database file or server, not :memory:")
        self.db = db
        self.rollout_id = rollout_id  # records submitted from now on go to this rollout
        self.settings = settings
        self.failure_rule = failure_rule
        self.on_label_joined = on_label_joined
        self.clock = clock
        self.capture = settings.capture
        self.cache: CaptureCache | None = (
            CaptureCache(settings.capture_cache_size, settings.capture_cache_bytes)
            if settings.capture == "failures"
            else None
        )
        self._queue: deque[_Item] = deque()
        self._bound = settings.buffer_size
        self._batch_size = settings.batch_size
        self._interval = settings.flush_interval_ms / 1000.0
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._closed = False
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None
        self._maintenance: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight = 0
        self._accepted = 0
        self._accepted_lock = threading.Lock()
        self._done = 0
        self._done_cv = threading.Condition()
        self._drop_log = _Throttled()
        self._error_log = _Throttled()
        # SQLite: the file's path and (device, inode) at start; None for a server.
        self._db_path: str | None = None
        if db.dialect == "sqlite" and db.url.database:
            self._db_path = os.path.abspath(db.url.database)
        self._file_id: tuple[int, int] | None = None
        self.file_problem: str | None = None

        registry = registry if registry is not None else CollectorRegistry()
        self.registry = registry
        self._written = Counter(
            "mirrorgate_recorder_written_total",
            "Pairs written to the database",
            registry=registry,
        )
        self._dropped = Counter(
            "mirrorgate_recorder_dropped_total",
            "Pairs never written, by reason",
            ["reason"],
            registry=registry,
        )
        self._labels_written = Counter(
            "mirrorgate_recorder_labels_written_total",
            "Labels written to the database",
            registry=registry,
        )
        self._labels_dropped = Counter(
            "mirrorgate_recorder_labels_dropped_total",
            "Labels never written, by reason",
            ["reason"],
            registry=registry,
        )
        self._errors = Counter(
            "mirrorgate_recorder_write_errors_total",
            "Failed database writes: transient (retried) or rejected (bad rows isolated)",
            ["kind"],
            registry=registry,
        )
        depth = Gauge(
            "mirrorgate_recorder_buffer_depth",
            "Records and labels waiting for the database (including the batch in flight)",
            registry=registry,
        )
        depth.set_function(lambda: len(self._queue) + self._inflight)
        for reason in DROP_REASONS:
            self._dropped.labels(reason)
            self._labels_dropped.labels(reason)
        for kind in ("transient", "rejected"):
            self._errors.labels(kind)
        file_ok = Gauge(
            "mirrorgate_recorder_database_file_ok",
            "1 while the SQLite file the recorder writes is still the one at its path "
            "(0: deleted or replaced, pairs are dropped as db_file_gone)",
            registry=registry,
        )
        file_ok.set_function(lambda: 0.0 if self.file_problem else 1.0)

    # -- the live path: never blocks, never raises ------------------------------------

    def submit(self, record: PairRecord, rollout_id: str | None = None) -> bool:
        """Queue a pair; False when it was dropped (counted). Input tensors must not be
        mutated afterwards (they are read later, on the writer thread)."""
        try:
            if self._closed:
                return self._drop("closed")
            if len(self._queue) >= self._bound:
                return self._drop("buffer_full")
            store_inputs = False
            if record.inputs:
                if self.capture == "all":
                    store_inputs = True
                elif self.cache is not None:
                    if self._is_failure(record):
                        store_inputs = True
                    else:
                        self.cache.put(record.id, record.inputs)
            self._enqueue((_PAIR, rollout_id or self.rollout_id, record, store_inputs))
            return True
        except Exception:
            log.exception("recorder: submit failed")
            return self._drop("error")

    def submit_label(
        self,
        record_id: str,
        label: Label,
        ts: float | None = None,
        *,
        source: str = "api",
    ) -> bool:
        """Queue a label for the pair(s) with this id; joined when both are stored, in
        either order. False when dropped (counted; the API may answer 503)."""
        try:
            if self._closed:
                return self._drop_label("closed")
            if len(self._queue) >= self._bound:
                return self._drop_label("buffer_full")
            now = self.clock()
            entry = LabelEntry(
                request_id=str(record_id),
                label=label,
                ts=now if ts is None else float(ts),
                received_at=now,
                source=source,
            )
            self._enqueue((_LABEL, "", entry, False))
            return True
        except Exception:
            log.exception("recorder: submit_label failed")
            return self._drop_label("error")

    def mark_failure(self, record_id: str) -> bool:
        """Capture ``failures``: store the held inputs of the pair with this id (a
        harvest rule decided it failed). False when its inputs are no longer held."""
        if self.cache is None or self._closed:
            return False
        inputs = self.cache.take(record_id)
        if inputs is None:
            return False
        self._enqueue((_CAPTURE, "", (record_id, inputs), True))
        return True

    def inputs_for(self, record_id: str) -> dict[str, np.ndarray] | None:
        """The held inputs of a recent pair (capture ``failures``), for harvest evidence."""
        return None if self.cache is None else self.cache.get(record_id)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Start the writer thread. Raises NotFoundError when the rollout is unknown."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._check_rollout)
        self._file_id = self._stat_file()
        self._thread = threading.Thread(target=self._run, name="mirrorgate-recorder", daemon=True)
        self._thread.start()
        self._maintenance = threading.Thread(
            target=self._run_maintenance, name="mirrorgate-recorder-maintenance", daemon=True
        )
        self._maintenance.start()

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything accepted so far is written or dropped; True if so."""
        target = self._accepted
        self._wake.set()
        if self._thread is None:
            await asyncio.to_thread(self._drain_unstarted)
        return await asyncio.to_thread(self._wait_done, target, timeout_s)

    async def aclose(self) -> None:
        """Stop accepting, write what was accepted (bounded by ``close_timeout_s`` while
        the database is down), stop the writer."""
        if not self._closed:
            self._closed = True
            self._deadline = time.monotonic() + self.settings.close_timeout_s
            self._closing.set()
            self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            if self._maintenance is not None:
                await asyncio.to_thread(self._maintenance.join)
        else:
            await asyncio.to_thread(self._drain_unstarted)

    @property
    def buffered(self) -> int:
        return len(self._queue) + self._inflight

    @property
    def closed(self) -> bool:
        return self._closed

    # -- internals: accounting ----------------------------------------------------------

    def _enqueue(self, item: _Item) -> None:
        with self._accepted_lock:  # the writer thread enqueues captures too
            self._accepted += 1
            self._queue.append(item)
        if len(self._queue) >= self._batch_size:
            self._wake.set()

    def _drop(self, reason: str, n: int = 1) -> Literal[False]:
        self._dropped.labels(reason).inc(n)
        self._drop_log(
            logging.WARNING,
            "recorder: dropped %d pair(s) (%s; %d waiting for the database)",
            n,
            reason,
            self.buffered,
        )
        return False

    def _drop_label(self, reason: str, n: int = 1) -> Literal[False]:
        self._labels_dropped.labels(reason).inc(n)
        self._drop_log(logging.WARNING, "recorder: dropped %d label(s) (%s)", n, reason)
        return False

    def _drop_batch(self, batch: _Batch, reason: str) -> None:
        if batch.pairs:
            self._drop(reason, len(batch.pairs))
        if batch.labels:
            self._drop_label(reason, len(batch.labels))
        if batch.captures:
            self._drop_log(
                logging.WARNING,
                "recorder: %d captured input(s) not stored (%s)",
                len(batch.captures),
                reason,
            )

    def _mark_done(self, n: int) -> None:
        with self._done_cv:
            self._done += n
            self._done_cv.notify_all()

    def _wait_done(self, target: int, timeout_s: float | None) -> bool:
        with self._done_cv:
            return self._done_cv.wait_for(lambda: self._done >= target, timeout_s)

    def _is_failure(self, record: PairRecord) -> bool:
        if self.failure_rule is None:
            return False
        try:
            return bool(self.failure_rule(record))
        except Exception:
            log.exception("recorder: failure rule raised; treating the pair as no failure")
            return False

    def _check_rollout(self) -> None:
        try:
            with self.db.engine.connect() as conn:
                found = conn.execute(
                    select(RolloutRow.id).where(RolloutRow.id == self.rollout_id)
                ).scalar()
        except SQLAlchemyError as exc:
            log.warning("recorder: cannot check rollout %s now (%s)", self.rollout_id, exc)
            return
        if found is None:
            raise NotFoundError(f"recorder: no rollout {self.rollout_id!r} in the database")

    # -- internals: the writer thread ---------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if not self._queue:
                    if self._closing.is_set():
                        return
                    self._wake.wait(self._interval)
                    self._wake.clear()
                elif len(self._queue) < self._batch_size and not self._closing.is_set():
                    # Flush by time: a partial batch waits about one interval.
                    self._wake.wait(self._interval)
                    self._wake.clear()
                items = self._take()
                if items:
                    started = time.monotonic()
                    self._process(items)
                    if len(self._queue) >= self._batch_size and not self._closing.is_set():
                        took = time.monotonic() - started
                        pause = min(took * _BACKLOG_PAUSE_RATIO, _BACKLOG_PAUSE_MAX_S)
                        self._closing.wait(pause)  # a shutdown cuts the pause short
                if self._closing.is_set() and time.monotonic() >= self._deadline:
                    self._abandon_queue()
            except Exception:  # a bug must not kill the writer: log, keep serving
                log.exception("recorder: writer loop error")
                time.sleep(self._interval)

    def _run_maintenance(self) -> None:
        # Its own thread: a long purge must not hold up the writer (on SQLite the
        # chunked deletes interleave with the writer's transactions).
        while not self._closing.wait(self.settings.purge_interval_s):
            try:
                self._maintain()
            except Exception:
                log.exception("recorder: maintenance error")

    def _take(self) -> list[_Item]:
        items: list[_Item] = []
        q = self._queue
        while q and len(items) < self._batch_size:
            items.append(q.popleft())
        self._inflight = len(items)
        return items

    def _abandon_queue(self) -> None:
        items = self._take()
        while items:
            self._drop_batch(self._prepare(items, encode=False), "shutdown")
            self._mark_done(len(items))
            items = self._take()
        self._inflight = 0

    def _drain_unstarted(self) -> None:
        # aclose()/flush() without start(): write inline on this worker thread.
        while self._queue:
            self._process(self._take())

    def _process(self, items: list[_Item]) -> None:
        try:
            if self.file_problem is not None and self._file_gone():
                # The file is gone for good (until a restart): encoding every record
                # only to drop it cost the live loop CPU ("database deleted").
                self._drop_batch(self._prepare(items, encode=False), "db_file_gone")
                return
            batch = self._prepare(items)
            if len(batch):
                self._write_batch(batch)
        except Exception:
            log.exception("recorder: unexpected error writing %d item(s)", len(items))
            pairs = sum(1 for item in items if item[0] == _PAIR)
            labels = sum(1 for item in items if item[0] == _LABEL)
            if pairs:
                self._drop("error", pairs)
            if labels:
                self._drop_label("error", labels)
        finally:
            self._inflight = 0
            self._mark_done(len(items))

    def _prepare(self, items: Sequence[_Item], *, encode: bool = True) -> _Batch:
        batch = _Batch()
        for n, (kind, rollout_id, payload, store_inputs) in enumerate(items, 1):
            if n % _YIELD_EVERY == 0:
                # Encoding is pure Python under the GIL: let the event loop in often, so
                # the live path waits microseconds, not a whole switch interval (5 ms).
                time.sleep(0)
            if kind == _PAIR:
                if not encode:
                    batch.pairs.append((None, payload.id))
                    continue
                try:
                    batch.pairs.append(
                        record_to_params(payload, rollout_id, store_inputs=store_inputs)
                    )
                    batch.ids.append(payload.id)
                except Exception as exc:
                    log.warning("recorder: cannot encode pair %r: %s", payload.id, exc)
                    self._drop("encode")
            elif kind == _LABEL:
                batch.labels.append(label_join.label_params(payload))
                batch.ids.append(payload.request_id)
            else:
                record_id, inputs = payload
                if not encode:
                    batch.captures.append({})
                    continue
                try:
                    blob = encode_inputs(inputs)
                except Exception as exc:
                    log.warning("recorder: cannot encode inputs of %r: %s", record_id, exc)
                    continue
                batch.captures.append({"q": record_id, "blob": blob})
        return batch

    def _stat_file(self) -> tuple[int, int] | None:
        if self._db_path is None:
            return None
        try:
            st = os.stat(self._db_path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _file_gone(self) -> bool:
        """SQLite only: is the file this process writes no longer the one at the path?"""
        if self._db_path is None or self._file_id is None:
            return False
        if self.file_problem is None:
            now = self._stat_file()
            if now == self._file_id:
                return False
            self.file_problem = (
                f"the database file {self._db_path} was deleted"
                if now is None
                else f"the database file {self._db_path} was replaced by another file"
            )
        self._error_log(
            logging.ERROR,
            "recorder: %s; pairs are dropped (db_file_gone) until a restart",
            self.file_problem,
        )
        return True

    def _write_batch(self, batch: _Batch) -> None:
        if self._file_gone():
            self._drop_batch(batch, "db_file_gone")
            return
        outcome = self._attempt(batch)
        if outcome == "rejected":
            if len(batch) == 1:
                self._drop_batch(batch, "rejected")
                return
            # Isolate the bad rows: the rest of the batch still lands.
            for single in batch.split():
                if self._attempt(single) == "rejected":
                    self._drop_batch(single, "rejected")

    def _attempt(self, batch: _Batch) -> str:
        """Write, retrying transient failures; 'ok', 'rejected' or 'shutdown'."""
        delay = self.settings.retry_initial_ms / 1000.0
        cap = self.settings.retry_max_ms / 1000.0
        while True:
            try:
                joined = self._write(batch)
            except TRANSIENT as exc:
                self._errors.labels("transient").inc()
                self._error_log(
                    logging.WARNING,
                    "recorder: database write failed, retrying (%d waiting): %s",
                    self.buffered,
                    _short(exc),
                )
                if self._closing.is_set():
                    remaining = self._deadline - time.monotonic()
                    if remaining <= 0:
                        self._drop_batch(batch, "shutdown")
                        return "shutdown"
                    time.sleep(min(delay, remaining))
                else:
                    self._closing.wait(delay)  # a shutdown cuts the wait short
                delay = min(delay * 2, cap)
                continue
            except SQLAlchemyError as exc:
                self._errors.labels("rejected").inc()
                self._error_log(
                    logging.ERROR, "recorder: database rejected a write: %s", _short(exc)
                )
                return "rejected"
            if self._file_gone():
                # Committed to an unlinked inode: nothing reached the disk.
                self._drop_batch(batch, "db_file_gone")
                return "ok"
            self._written.inc(len(batch.pairs))
            self._labels_written.inc(len(batch.labels))
            if joined:
                self._after_join(joined)
            return "ok"

    def _write(self, batch: _Batch) -> list[PairRecord]:
        want = self.on_label_joined is not None or self.cache is not None
        with self.db.engine.begin() as conn:
            insert_pairs(conn, batch.pairs)
            label_join.insert_label_params(conn, batch.labels)
            if batch.captures:
                conn.execute(
                    update(PAIRS)
                    .where(
                        PAIRS.c.request_id == bindparam("q"),
                        PAIRS.c.inputs.is_(None),
                    )
                    .values(inputs=bindparam("blob")),
                    batch.captures,
                )
            if not batch.ids or not (batch.labels or label_join.any_pending(conn)):
                return []
            return label_join.join_pending(conn, batch.ids, now=self.clock(), want_records=want)

    def _after_join(self, joined: list[PairRecord]) -> None:
        if self.cache is not None:
            for record in joined:
                if self._is_failure(record):
                    inputs = self.cache.take(record.id)
                    if inputs is not None:
                        # Written by a later batch (the pair is already in the database).
                        self._enqueue((_CAPTURE, "", (record.id, inputs), True))
        callback = self.on_label_joined
        if callback is None:
            return
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(_safe_call, callback, joined)
                return
            except RuntimeError:  # the loop closed meanwhile
                return
        _safe_call(callback, joined)

    def _maintain(self) -> None:
        s = self.settings
        want = self.on_label_joined is not None or self.cache is not None
        try:
            joined: list[PairRecord] = []
            with self.db.engine.begin() as conn:
                ids = label_join.open_ids_with_pairs(conn)
                if ids:
                    joined = label_join.join_pending(conn, ids, now=self.clock(), want_records=want)
            if joined:  # after the commit, as for the writer's own joins
                self._after_join(joined)
            purge(
                self.db,
                retention_days=s.retention_days,
                retention_rows=s.retention_rows,
                label_window_s=s.label_window_s,
                now=self.clock(),
            )
        except SQLAlchemyError as exc:
            log.warning("recorder: maintenance (label sweep, retention) failed: %s", _short(exc))


def _safe_call(callback: Callable[[list[PairRecord]], None], records: list[PairRecord]) -> None:
    try:
        callback(records)
    except Exception:
        log.exception("recorder: on_label_joined callback raised")


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
