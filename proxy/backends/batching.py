"""Dynamic micro-batching for in-process backends (Triton's dynamic batcher, in asyncio).

Concurrent ``infer`` calls whose tensors agree on everything but the batch axis (same
input names, dtypes, non-batch dimensions and requested outputs) wait in one queue. A
queue is run as one stacked call when it holds ``max_batch_size`` rows or when its oldest
request has waited ``max_batch_delay_ms``, and the outputs are split back by row. At most
``max_concurrent_batches`` stacked calls run at once; while they are busy, new requests
keep queueing, so batches grow with load (with ``max_batch_delay_ms: 0`` a lone request
runs at once, and only requests arriving behind a busy model are stacked).

Isolation of bad requests, in two layers:

1. Requests that differ in shape or dtype never share a queue, so a malformed request is
   stacked only with requests malformed the same way.
2. Faults that depend on values (a number that cannot be cast exactly, an index out of
   range) are found by the runtime only after stacking: when a stacked call fails, each
   member is re-run on its own, so only the faulty one gets the error. A stacked result
   whose outputs do not have one row per input row (a model that mixes rows) switches
   batching off for the backend, with a warning: such a model cannot be batched.

A runtime with a synchronous thread-safe entry (``run_sync``, as OnnxBackend has) is run
by the batcher's own threads, one per concurrent batch, which take each formed batch
straight from a queue and complete it with one loop callback; others go through
``inner.infer``.

Requests larger than ``max_batch_size`` rows (Triton refuses them; here they run alone)
and requests without a common batch axis go straight to the runtime. Each call into the
runtime made here is observed, by rows, in ``mirrorgate_batcher_batch_size{model}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable, Hashable
from operator import itemgetter

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from proxy.core.config import BatchingSettings
from proxy.core.errors import BackendError, NotReady
from proxy.protocol.base import Backend, ModelIdentity, ModelMetadata

log = logging.getLogger(__name__)

BATCH_SIZE_METRIC = "mirrorgate_batcher_batch_size"
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# Like Triton's default of two CPU instances: one stacked call computes while the next fills.
DEFAULT_CONCURRENT_BATCHES = 2

_histograms: weakref.WeakKeyDictionary[CollectorRegistry, Histogram] = weakref.WeakKeyDictionary()


def batch_size_histogram(registry: CollectorRegistry) -> Histogram:
    """The registry's one batch-size histogram (champion and candidate share it by label)."""
    existing = _histograms.get(registry)
    if existing is None:
        # Someone else (the app's metrics module) may have registered it already.
        found = getattr(registry, "_names_to_collectors", {}).get(BATCH_SIZE_METRIC)
        if isinstance(found, Histogram):
            existing = found
        else:
            existing = Histogram(
                BATCH_SIZE_METRIC,
                "Rows per call into an in-process model runtime made by the micro-batcher.",
                ["model"],
                buckets=BATCH_SIZE_BUCKETS,
                registry=registry,
            )
        _histograms[registry] = existing
    return existing


class _Batch:
    """Requests of one key gathered for one stacked call: parallel lists, no per-request
    object beyond the caller's own future (the hot path allocates as little as it can)."""

    __slots__ = ("counts", "enqueued", "futures", "inputs", "outputs", "rows")

    def __init__(self, outputs: list[str] | None, enqueued: float) -> None:
        self.inputs: list[dict[str, np.ndarray]] = []
        self.outputs = outputs
        self.futures: list[asyncio.Future[dict[str, np.ndarray]]] = []
        self.counts: list[int] = []
        self.rows = 0
        self.enqueued = enqueued

    def drop_cancelled(self) -> None:
        """Forget members whose callers gave up while queued: their rows are not run."""
        keep = [i for i, f in enumerate(self.futures) if not f.done()]
        if len(keep) == len(self.futures):
            return
        self.inputs = [self.inputs[i] for i in keep]
        self.futures = [self.futures[i] for i in keep]
        self.counts = [self.counts[i] for i in keep]
        self.rows = sum(self.counts)


def _rows(inputs: dict[str, np.ndarray]) -> int | None:
    """The common batch-axis length of all inputs, or None if there is none."""
    counts = {a.shape[0] if a.ndim else None for a in inputs.values()}
    if len(counts) != 1:
        return None
    (rows,) = counts
    return rows if rows else None


def _key(inputs: dict[str, np.ndarray], outputs: list[str] | None) -> Hashable:
    """Requests may share a stacked call only if their keys are equal."""
    items = inputs.items() if len(inputs) == 1 else sorted(inputs.items())
    tensors = tuple([(n, a.dtype, a.shape[1:]) for n, a in items])
    return tensors, None if outputs is None else tuple(outputs)


class BatchingBackend:
    """Wraps an in-process backend; same interface, concurrent calls stacked on axis 0."""

    def __init__(
        self,
        inner: Backend,
        settings: BatchingSettings,
        registry: CollectorRegistry | None = None,
        *,
        max_concurrent_batches: int = DEFAULT_CONCURRENT_BATCHES,
    ) -> None:
        if max_concurrent_batches < 1:
            raise ValueError("max_concurrent_batches must be >= 1")
        self._inner = inner
        self._max_rows = settings.max_batch_size
        self._delay_s = settings.max_batch_delay_ms / 1000.0
        self._slots = max_concurrent_batches
        self._model = inner.metadata.name
        # A declared fixed leading dimension (e.g. [1, 4]) means the model cannot batch.
        self._enabled = self._max_rows > 1 and all(
            s.shape and s.shape[0] == -1 for s in inner.metadata.inputs
        )
        if self._max_rows > 1 and not self._enabled:
            log.warning("model %s declares a fixed batch dimension; not batching", self._model)
        metric = batch_size_histogram(registry if registry is not None else CollectorRegistry())
        self._observe = metric.labels(model=self._model).observe
        self._open: dict[Hashable, _Batch] = {}  # per key, the batch still filling up
        self._full: deque[_Batch] = deque()  # batches that cannot grow, oldest first
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._draining = False
        self.calls = 0  # calls into the inner runtime made from the queues
        self.rows = 0  # rows in those calls
        # A runtime with a synchronous, thread-safe entry (OnnxBackend.run_sync) is run
        # by the batcher's own threads, one per concurrent batch, which take the next
        # formed batch as soon as they finish one: no executor hop and no round trip
        # through the event loop between batches (each costs a thread wake-up, which on
        # a loaded machine takes longer than the model). Others go through inner.infer.
        direct = getattr(inner, "run_sync", None)
        self._direct: Callable[..., dict[str, np.ndarray]] | None = (
            direct if callable(direct) else None
        )
        self._work: queue.SimpleQueue[tuple[_Batch, asyncio.AbstractEventLoop] | None] = (
            queue.SimpleQueue()
        )
        self._workers: list[threading.Thread] = []
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def inner(self) -> Backend:
        return self._inner

    @property
    def metadata(self) -> ModelMetadata:
        return self._inner.metadata

    @property
    def identity(self) -> ModelIdentity:
        inner = self._inner.identity
        extra = {**inner.extra, "max_batch_size": str(self._max_rows)}
        extra["max_batch_delay_ms"] = str(self._delay_s * 1000.0)
        return dataclasses.replace(inner, extra=extra)

    async def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        if self._closed:
            raise NotReady(f"model {self._model!r} is shut down")
        if not self._enabled or not inputs:
            return await self._inner.infer(inputs, outputs)
        # The hot path, once per request: one input (the common case) costs a shape
        # lookup and a tuple, no per-request dict or set.
        if len(inputs) == 1:
            ((name, array),) = inputs.items()
            if type(array) is not np.ndarray:
                array = np.asarray(array)
                inputs = {name: array}
            shape = array.shape
            rows = shape[0] if shape else None
            key: Hashable = (
                name,
                array.dtype,
                shape[1:],
                None if outputs is None else tuple(outputs),
            )
        else:
            inputs = {n: np.asarray(a) for n, a in inputs.items()}
            rows = _rows(inputs)
            key = _key(inputs, outputs)
        if not rows:
            return await self._inner.infer(inputs, outputs)
        if rows > self._max_rows:
            self._count(rows)
            return await self._inner.infer(inputs, outputs)
        loop = asyncio.get_running_loop()
        batch = self._open.get(key)
        sealed = False
        if batch is not None and batch.rows + rows > self._max_rows:
            # This request does not fit: the open batch is as full as it gets.
            del self._open[key]
            self._full.append(batch)
            batch, sealed = None, True
        if batch is None:
            batch = self._open[key] = _Batch(outputs, loop.time())
        future: asyncio.Future[dict[str, np.ndarray]] = loop.create_future()
        batch.inputs.append(inputs)
        batch.futures.append(future)
        batch.counts.append(rows)
        batch.rows += rows
        if batch.rows >= self._max_rows:
            del self._open[key]
            self._full.append(batch)
            sealed = True
        # Rescheduling per request would dominate: only when something can start now
        # (a batch just filled up, or no timer is armed yet) and a slot is free (else a
        # finishing batch reschedules).
        if self._running < self._slots and (sealed or self._timer is None or self._delay_s <= 0):
            self._schedule()
        return await future

    # -- scheduling (all on the event loop, no locks needed) --

    def _schedule(self) -> None:
        """Start every due batch a free slot allows; arm one timer for the next due one."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        # With the batcher's own threads, a full batch (it cannot grow) is queued for
        # them even while every thread is busy, one per thread at most: a thread that
        # finishes picks it up without waiting for the loop.
        ahead = self._slots if self._direct is not None else 0
        while self._running < self._slots + ahead:
            if self._full:  # full batches first, oldest first
                batch = self._full.popleft()
            elif self._open and self._running < self._slots:
                # Open batches are created in arrival order and the dict keeps it: the
                # first one has waited longest.
                key = next(iter(self._open))
                batch = self._open[key]
                if not (self._draining or batch.enqueued + self._delay_s <= now):
                    break
                del self._open[key]
            else:
                break
            batch.drop_cancelled()
            if not batch.futures:
                continue
            self._running += 1
            if self._direct is not None:
                self._idle.clear()
                self._start_workers()
                self._work.put((batch, loop))
                continue
            task = loop.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._running < self._slots and self._open and not self._full:
            deadline = next(iter(self._open.values())).enqueued + self._delay_s
            self._timer = loop.call_at(deadline, self._schedule)

    # -- running --

    def _count(self, rows: int) -> None:
        self.calls += 1
        self.rows += rows
        self._observe(rows)

    async def _run(self, batch: _Batch) -> None:
        try:
            if len(batch.futures) == 1 or not self._enabled:
                await self._run_alone(batch)
                return
            try:
                out = await self._run_stacked(batch)
            except Exception as exc:
                log.debug("stacked call of %d failed (%s); running alone", len(batch.futures), exc)
                await self._run_alone(batch)
                return
            # Basic slices are views: no copy per request. One dict per request is the
            # least the interface allows.
            items = list(out.items())
            start = 0
            for future, rows in zip(batch.futures, batch.counts, strict=True):
                end = start + rows
                if not future.done():
                    future.set_result({n: a[start:end] for n, a in items})
                start = end
        finally:
            self._running -= 1
            if self._open or self._full:
                self._schedule()

    async def _run_stacked(self, batch: _Batch) -> dict[str, np.ndarray]:
        members = batch.inputs
        total = batch.rows
        if len(members[0]) == 1:
            ((name, _),) = members[0].items()
            stacked = {name: np.concatenate([m[name] for m in members], axis=0)}
        else:
            stacked = {n: np.concatenate([m[n] for m in members], axis=0) for n in members[0]}
        self._count(total)
        out = await self._inner.infer(stacked, batch.outputs)
        bad = [n for n, a in out.items() if a.ndim == 0 or a.shape[0] != total]
        if bad:
            self._enabled = False
            log.warning(
                "model %s: output(s) %s lack one row per input row; batching switched off",
                self._model,
                bad,
            )
            raise BackendError(f"model {self._model!r} cannot be batched")
        return out

    async def _run_alone(self, batch: _Batch) -> None:
        """Each member on its own (a failed stacked call: only the faulty one fails)."""
        await asyncio.gather(
            *(
                self._run_one(inputs, batch.outputs, rows, future)
                for inputs, rows, future in zip(
                    batch.inputs, batch.counts, batch.futures, strict=True
                )
            )
        )

    async def _run_one(
        self,
        inputs: dict[str, np.ndarray],
        outputs: list[str] | None,
        rows: int,
        future: asyncio.Future[dict[str, np.ndarray]],
    ) -> None:
        if future.done():
            return
        self._count(rows)
        try:
            result = await self._inner.infer(inputs, outputs)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(result)

    # -- the batcher's own threads (runtimes with run_sync) --

    def _start_workers(self) -> None:
        while len(self._workers) < self._slots:
            thread = threading.Thread(
                target=self._worker,
                name=f"mirrorgate-batcher-{self._model}-{len(self._workers)}",
                daemon=True,
            )
            thread.start()
            self._workers.append(thread)

    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            batch, loop = item
            try:
                outcomes, calls, mixes = self._compute(batch)
            except BaseException as exc:  # never leave callers waiting
                outcomes = [exc] * len(batch.futures)
                calls, mixes = [], False
            try:
                loop.call_soon_threadsafe(self._deliver, batch, outcomes, calls, mixes)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _compute(
        self, batch: _Batch
    ) -> tuple[list[dict[str, np.ndarray] | BaseException], list[int], bool]:
        """On a worker thread: run the batch stacked, split the result into views, or
        (one member, or the stacked call failed) run each member alone. Each outcome is
        the member's result, or the exception it gets."""
        assert self._direct is not None
        run = self._direct
        members, outputs = batch.inputs, batch.outputs
        calls: list[int] = []
        mixes = False
        if len(members) > 1 and self._enabled:
            total = batch.rows
            calls.append(total)
            try:
                # map/itemgetter and dict literals: no comprehension frame per batch or
                # per member (this runs once per batch, under the GIL the loop needs).
                first = members[0]
                if len(first) == 1:
                    (name,) = first
                    stacked = {name: np.concatenate(list(map(itemgetter(name), members)))}
                else:
                    stacked = {n: np.concatenate(list(map(itemgetter(n), members))) for n in first}
                out = run(stacked, outputs)
                mixes = any(a.ndim == 0 or a.shape[0] != total for a in out.values())
                if not mixes:
                    return self._split(out, batch.counts), calls, mixes
            except Exception as exc:
                log.debug("stacked call of %d failed (%s); running alone", len(members), exc)
        outcomes: list[dict[str, np.ndarray] | BaseException] = []
        for inputs, rows in zip(members, batch.counts, strict=True):
            calls.append(rows)
            try:
                outcomes.append(run(inputs, outputs))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes, calls, mixes

    @staticmethod
    def _split(
        out: dict[str, np.ndarray], counts: list[int]
    ) -> list[dict[str, np.ndarray] | BaseException]:
        """Per member, views of its rows (basic slices: no copy)."""
        results: list[dict[str, np.ndarray] | BaseException] = []
        append = results.append
        start = 0
        if len(out) == 1:  # the common case: one dict literal per member
            ((name, array),) = out.items()
            if len(counts) == len(array):  # every member one row (each has >= 1)
                for start in range(len(counts)):
                    append({name: array[start : start + 1]})
                return results
            for rows in counts:
                end = start + rows
                append({name: array[start:end]})
                start = end
            return results
        items = list(out.items())
        for rows in counts:
            end = start + rows
            append({n: a[start:end] for n, a in items})
            start = end
        return results

    def _deliver(
        self,
        batch: _Batch,
        outcomes: list[dict[str, np.ndarray] | BaseException],
        calls: list[int],
        mixes: bool,
    ) -> None:
        """On the loop: one callback completes a whole batch."""
        for rows in calls:
            self._count(rows)
        if mixes and self._enabled:
            self._enabled = False
            log.warning(
                "model %s: outputs lack one row per input row; batching switched off",
                self._model,
            )
        for future, value in zip(batch.futures, outcomes, strict=True):
            if not future.done():
                if isinstance(value, BaseException):
                    future.set_exception(value)
                else:
                    future.set_result(value)
        self._running -= 1
        if self._open or self._full:
            self._schedule()
        if self._running == 0:
            self._idle.set()

    async def aclose(self) -> None:
        """Refuse new calls, run everything queued now, wait for it, close the runtime."""
        if self._closed:
            return
        self._closed = True
        self._draining = True
        while self._open or self._full or self._tasks or self._running:
            if self._open or self._full:
                self._schedule()
            if self._tasks:
                await asyncio.wait(set(self._tasks))
            if self._running and self._direct is not None:
                await self._idle.wait()
        if self._timer is not None:
            self._timer.cancel()
        for _ in self._workers:
            self._work.put(None)
        for thread in self._workers:
            await asyncio.to_thread(thread.join)
        await self._inner.aclose()
