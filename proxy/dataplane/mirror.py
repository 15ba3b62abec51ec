"""Mirror dispatch: serve the live request, compute the other model off the live path.

Modes (``mirror.mode``):

* ``shadow``: the champion answers every request; after its answer is ready the same
  inputs are queued for the candidate. The candidate is never served.
* ``canary``: a share ``canary_weight`` of requests is answered by the candidate; the
  champion is then computed off the live path for the pair. Routing is sticky when
  ``mirror.sticky_header`` is set and present: a request goes to the candidate when
  ``sha256(header value)`` mapped to [0, 1) is below the weight, so a user stays on one
  model, and raising the weight only moves users champion -> candidate. A candidate that
  fails on a canary request is never seen by the client: the champion answers it.

``set_canary_weight`` and ``set_stage`` are for the rollout engine; a weight above 0
serves the candidate whatever the configured mode was (the rollout plan is the
authority once it runs).

Mirrored work is bounded: at most ``max_in_flight`` calls run, at most ``queue_size``
requests (and ``max_queue_bytes`` of their inputs) wait; anything past that is dropped
and counted in ``mirrorgate_shadow_dropped_total{reason}``. ``sample_rate`` picks the
share of requests mirrored at all (not counted as drops: it is a choice, not overload).
Each mirrored call has the ``mirror.timeout_ms`` deadline. The live path never awaits
any of it: it only appends to a deque or starts a task.

Each finished pair becomes one :class:`PairRecord` per row of the request, handed to
every sink (``submit`` never blocks). A failed call becomes that side's ``error``: a
reason token (``timeout``, ``backend_error``, ``bad_request``, ``missing_output``,
``non_finite_output``, ``non_numeric_output``, ``shape_mismatch``, ``exception``), then
``": "`` and the message. Failures of mirrored calls and of the candidate on the live
path are counted in ``mirrorgate_shadow_failures_total{reason}``. A champion failure on
the live path is the client's 5xx and records no pair.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from gates.records import ModelResult, PairRecord
from proxy.backends.datatypes import v2_datatype
from proxy.core import context
from proxy.core.config import MirrorgateConfig
from proxy.core.errors import BackendError, BackendTimeout, BadRequest, ConfigError, MirrorgateError
from proxy.core.metrics import ProxyMetrics
from proxy.dataplane.breaker import CircuitBreaker
from proxy.dataplane.slicing import Slicer
from proxy.protocol.base import Backend
from proxy.protocol.digest import inputs_digest
from proxy.protocol.headers import forwarded_headers
from storage.sink import PairSink

log = logging.getLogger(__name__)

Role = Literal["champion", "candidate"]

# Records for requests with more input bytes than this are built in a worker thread.
OFFLOAD_BYTES = 1 << 20
# How many not-mirrored request ids are remembered for the gates' join (~100 B each).
NOT_MIRRORED_KEPT = 16_384
_ERROR_MESSAGE_LEN = 300


@dataclass(frozen=True, slots=True)
class LiveResult:
    """What the client gets: the serving model's outputs."""

    outputs: dict[str, np.ndarray]
    served_by: Role


@dataclass(slots=True)
class CallOutcome:
    outputs: dict[str, np.ndarray] | None
    latency_s: float
    error: str | None = None
    reason: str | None = None


@dataclass(slots=True)
class _Job:
    request_id: str
    ts: float
    inputs: dict[str, np.ndarray]
    slices: dict[str, str]
    stage: str
    served_by: Role
    live: CallOutcome
    todo: Role | None  # the model still to compute; None when both are done
    nbytes: int
    # The outputs the live side was asked for (None: its defaults): the other side is
    # asked for exactly these, never more (docs/proxy.md, "Outputs").
    outputs: list[str] | None = None
    headers: tuple[tuple[str, str], ...] = ()  # the client's end-to-end request headers
    # Pass-through (remote champion): fills inputs and live.outputs from the raw bytes,
    # off the live path; raises MirrorgateError when they cannot be decoded.
    decode: Callable[[_Job], None] | None = None
    decode_offload: bool = False  # decode in a worker thread (a compressed body)


class Handoff(Protocol):
    """Where a live process sends mirrored work it does not run itself."""

    def submit(self, job: _Job, other: CallOutcome | None) -> None: ...


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, BackendTimeout | TimeoutError):
        return "timeout"
    if isinstance(exc, BadRequest) or (isinstance(exc, MirrorgateError) and exc.status == 400):
        # The model rejected inputs the live path accepted: an interface incompatibility.
        return "bad_request"
    if isinstance(exc, BackendError):
        return "backend_error"
    if isinstance(exc, MirrorgateError):
        return "error"
    return "exception"


def _status_of(exc: BaseException) -> int:
    if isinstance(exc, MirrorgateError):
        return exc.status
    if isinstance(exc, TimeoutError):
        return 504
    return 500


def _error_text(reason: str, exc: BaseException) -> str:
    message = exc.message if isinstance(exc, MirrorgateError) else (str(exc) or type(exc).__name__)
    return f"{reason}: {message}"[:_ERROR_MESSAGE_LEN]


def _hash_unit(key: str) -> float:
    """A stable point in [0, 1) for a sticky-routing key."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _nbytes(inputs: Mapping[str, np.ndarray]) -> int:
    total = 0
    for array in inputs.values():
        if array.dtype == object:
            total += sum(len(x) if isinstance(x, bytes) else 64 for x in array.reshape(-1))
        else:
            total += array.nbytes
    return total


def output_datatype(array: np.ndarray) -> str | None:
    """The V2 datatype of an output array (None for a dtype V2 has no name for)."""
    try:
        return v2_datatype(array.dtype)
    except MirrorgateError:
        return None


def input_rows(inputs: Mapping[str, np.ndarray]) -> int | None:
    """The common leading-axis length of every input, or None when there is none."""
    firsts = {a.shape[0] if a.ndim else None for a in inputs.values()}
    if len(firsts) != 1:
        return None
    return firsts.pop()


def _latency_since(start: float) -> float:
    """A model call's latency: the transport's measurement when it left one (the raw
    pool's kernel receive timestamps, ``context.upstream_latency``), else this await's
    ``perf_counter``, which a descheduled worker stretches (docs/benchmarks.md,
    "Upstream latency from kernel timestamps")."""
    measured = context.upstream_latency.get()
    return time.perf_counter() - start if measured is None else measured


class MirrorDispatcher:
    """Serves live requests and runs the bounded mirrored work that builds pairs."""

    def __init__(
        self,
        *,
        champion: Backend,
        candidate: Backend | None,
        config: MirrorgateConfig,
        sinks: Sequence[PairSink],
        metrics: ProxyMetrics,
        slicer: Slicer | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.champion = champion
        self.candidate = candidate
        self._config = config
        self._mirror = config.mirror
        self.sinks = list(sinks)
        self.metrics = metrics
        self.slicer = slicer or Slicer(config.slices, config.features)
        self._rng = rng or random.Random()
        self._clock = clock
        self._timeouts: dict[Role, float] = {
            "champion": config.models.champion.timeout_ms / 1000.0,
            "candidate": (config.models.candidate or config.models.champion).timeout_ms / 1000.0,
        }
        self._shadow_timeout = self._mirror.timeout_ms / 1000.0
        self._capture = config.storage.capture != "never"
        self._task = config.output.task
        self._weight = 0.0
        self._stage = ""
        self._candidate_stopped = False
        # Ids of recent requests this dispatcher chose not to mirror (not sampled,
        # circuit open, queue full): their labels need not wait for a pair in the gates'
        # join (docs/faults.md). Bounded; an id pushed out only means its label waits.
        self._not_mirrored: OrderedDict[str, None] = OrderedDict()
        self._queue: deque[_Job] = deque()
        self._queued_bytes = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._stopped = False
        self.breaker = CircuitBreaker(self._mirror.circuit, registry=metrics.registry)
        # Set by ``mirrorgate serve`` on a live process: mirrored work goes to the shadow
        # worker process (proxy/shadow/) instead of running on this event loop.
        self.handoff: Handoff | None = None
        try:
            self.set_canary_weight(
                self._mirror.canary_weight if self._mirror.mode == "canary" else 0
            )
        except ValueError as exc:
            raise ConfigError(f"mirror.canary_weight: {exc}") from exc
        self.set_stage("canary" if self._weight > 0 else "shadow")

    # ----------------------------------------------------------------- rollout hooks

    @property
    def canary_weight(self) -> float:
        return self._weight

    @property
    def stage(self) -> str:
        return self._stage

    def set_canary_weight(self, weight: float) -> None:
        weight = float(weight)
        if not math.isfinite(weight) or not 0.0 <= weight <= 1.0:
            raise ValueError(f"canary weight must be within [0, 1], got {weight}")
        if weight > 0 and self.candidate is None:
            raise ValueError("no candidate model is configured to serve canary traffic")
        if self._candidate_stopped:
            weight = 0.0
        self._weight = weight
        self.metrics.rollout_canary_weight.set(weight)

    def stop_candidate(self) -> None:
        """The rollout aborted: no more requests go to the candidate, mirrored or
        served (already queued mirrored work still finishes). Final for this dispatcher."""
        self._candidate_stopped = True
        self._weight = 0.0
        self.metrics.rollout_canary_weight.set(0.0)

    def restart_candidate(self) -> None:
        """A new rollout started for a new candidate revision: it may be called again
        (at the weight its first stage sets)."""
        self._candidate_stopped = False

    @property
    def candidate_stopped(self) -> bool:
        return self._candidate_stopped

    def never_paired(self, request_id: str) -> bool:
        """True when no pair for ``request_id`` will reach the sinks from now on: the
        candidate is stopped, or this dispatcher recently chose not to mirror it. Called
        by the gates' worker thread (a read of a flag and a dict lookup)."""
        return self._candidate_stopped or request_id in self._not_mirrored

    def _skip(self, request_id: str, reason: str | None) -> None:
        if reason is not None:
            self._drop(reason)
        self._not_mirrored[request_id] = None
        if len(self._not_mirrored) > NOT_MIRRORED_KEPT:
            self._not_mirrored.popitem(last=False)

    def set_stage(self, name: str) -> None:
        self._stage = name
        self.metrics.set_stage(name)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def gated_output(self, role: Role) -> str | None:
        """The output tensor a pair records for this model."""
        if self._config.output.output:
            return self._config.output.output
        backend = self.champion if role == "champion" else self.candidate
        if backend is not None and backend.metadata.outputs:
            return backend.metadata.outputs[0].name
        return None

    # ----------------------------------------------------------------- live path

    def routes_to_candidate(self, sticky_key: str | None) -> bool:
        """Whether this request goes to the candidate (canary routing, one draw)."""
        return self._routes_to_candidate(sticky_key)

    def _routes_to_candidate(self, sticky_key: str | None) -> bool:
        weight = self._weight
        if self.candidate is None or weight <= 0.0 or self._candidate_stopped:
            return False
        if weight >= 1.0:
            return True
        if sticky_key is not None:
            return _hash_unit(sticky_key) < weight
        return self._rng.random() < weight

    def _wanted(self, requested: list[str] | None, role: Role) -> list[str] | None:
        # No names: each side returns its defaults. Names: those plus the configured
        # gated output (never an output chosen from one side's metadata).
        if requested is None:
            return None
        gated = self._config.output.output
        if gated is None or gated in requested:
            return list(requested)
        return [*requested, gated]

    async def _call(
        self,
        role: Role,
        inputs: dict[str, np.ndarray],
        outputs: list[str] | None,
        timeout_s: float,
        request_id: str,
    ) -> dict[str, np.ndarray]:
        """One model call with its deadline; records the per-role call metrics."""
        backend = self.champion if role == "champion" else self.candidate
        assert backend is not None
        context.request_id.set(request_id)
        settings = (
            self._config.models.champion if role == "champion" else self._config.models.candidate
        )
        context.upstream_headers.set(
            forwarded_headers(context.client_headers.get(), settings, role)
        )
        context.upstream_latency.set(None)  # set again by a backend that measures it
        start = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                result = await backend.infer(inputs, outputs)
        except TimeoutError as exc:
            self.metrics.observe_call(role, 504, time.perf_counter() - start)
            raise BackendTimeout(f"{role} model timed out after {timeout_s * 1000:g} ms") from exc
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.metrics.observe_call(role, _status_of(exc), time.perf_counter() - start)
            raise
        self.metrics.observe_call(role, 200, _latency_since(start))
        return result

    async def infer(
        self,
        inputs: dict[str, np.ndarray],
        *,
        request_id: str,
        outputs: list[str] | None = None,
        slices: Mapping[str, str] | None = None,
        sticky_key: str | None = None,
        to_candidate: bool | None = None,
    ) -> LiveResult:
        """Answer one live request; schedule the mirrored half without awaiting it.

        Raises the champion's error (a MirrorgateError with its 5xx status) when the
        model that must answer fails.
        """
        ts = self._clock()
        slices = dict(slices or {})
        stage = self._stage
        routes = self._routes_to_candidate(sticky_key) if to_candidate is None else to_candidate
        if routes and self.breaker.allow():
            # (An open circuit sends canary requests to the champion: a dead candidate
            # must not cost the live path its timeout first.)
            start = time.perf_counter()
            try:
                out = await self._call(
                    "candidate",
                    inputs,
                    self._wanted(outputs, "candidate"),
                    self._timeouts["candidate"],
                    request_id,
                )
            except asyncio.CancelledError:
                self.breaker.cancelled()
                raise
            except Exception as exc:
                failed = self._failed(exc, time.perf_counter() - start)
                self.breaker.record(False, failed.reason)
                self.metrics.shadow_failures.labels(reason=failed.reason).inc()
                log.warning(
                    "candidate failed on a canary request; champion answers: %s", failed.error
                )
                start = time.perf_counter()
                champ = await self._call(
                    "champion",
                    inputs,
                    self._wanted(outputs, "champion"),
                    self._timeouts["champion"],
                    request_id,
                )
                both = CallOutcome(champ, time.perf_counter() - start)
                self._record_now(request_id, ts, inputs, slices, stage, both, failed)
                return LiveResult(champ, "champion")
            self.breaker.record(True)
            live = CallOutcome(out, time.perf_counter() - start)
            self._mirror_later(
                request_id,
                ts,
                inputs,
                slices,
                stage,
                "candidate",
                live,
                self._wanted(outputs, "candidate"),
            )
            return LiveResult(out, "candidate")
        start = time.perf_counter()
        out = await self._call(
            "champion",
            inputs,
            self._wanted(outputs, "champion"),
            self._timeouts["champion"],
            request_id,
        )
        if self.candidate is not None and not self._candidate_stopped:
            live = CallOutcome(out, time.perf_counter() - start)
            self._mirror_later(
                request_id,
                ts,
                inputs,
                slices,
                stage,
                "champion",
                live,
                self._wanted(outputs, "champion"),
            )
        elif self.candidate is not None:
            # Aborted: no pair by design; counted so answered = pairs + drops holds.
            self._drop("candidate_stopped")
        return LiveResult(out, "champion")

    @staticmethod
    def _failed(exc: BaseException, latency_s: float) -> CallOutcome:
        reason = failure_reason(exc)
        return CallOutcome(None, latency_s, _error_text(reason, exc), reason)

    # ----------------------------------------------------------------- mirrored work

    def _mirror_later(
        self,
        request_id: str,
        ts: float,
        inputs: dict[str, np.ndarray],
        slices: dict[str, str],
        stage: str,
        served_by: Role,
        live: CallOutcome,
        outputs: list[str] | None = None,
    ) -> None:
        rate = self._mirror.sample_rate
        if rate < 1.0 and self._rng.random() >= rate:
            self._skip(request_id, None)
            return
        todo: Role = "candidate" if served_by == "champion" else "champion"
        if todo == "candidate" and self.breaker.rejecting():
            self._skip(request_id, "circuit_open")  # costs a counter, nothing else
            return
        job = _Job(request_id, ts, inputs, slices, stage, served_by, live, todo, _nbytes(inputs))
        job.outputs = outputs
        job.headers = context.client_headers.get()
        self._submit(job)

    def mirror_exchange(
        self,
        request_id: str,
        *,
        slices: Mapping[str, str],
        latency_s: float,
        nbytes: int,
        decode: Callable[[_Job], None],
        offload: bool = False,
        served_by: Role = "champion",
        other: CallOutcome | None = None,
    ) -> None:
        """A remote model answered the client directly (pass-through): queue the pair,
        whose request and answer ``decode`` reads from the raw bytes off the live path.

        ``served_by``: whose answer the client got (``"candidate"``: a canary request;
        the champion is then called for the pair). ``other``: the other side's outcome
        when it is already known (a canary request the candidate failed): only the
        records remain, as in :meth:`infer`'s fallback."""
        if self.candidate is None:
            return
        if other is None:
            if served_by == "champion" and self._candidate_stopped:
                # Aborted: no pair by design; counted so answered = pairs + drops holds.
                self._drop("candidate_stopped")
                return
            rate = self._mirror.sample_rate
            if rate < 1.0 and self._rng.random() >= rate:
                self._skip(request_id, None)
                return
            if served_by == "champion" and self.breaker.rejecting():
                # a dead candidate costs a counter, nothing else
                self._skip(request_id, "circuit_open")
                return
        todo: Role | None = None
        if other is None:
            todo = "candidate" if served_by == "champion" else "champion"
        live = CallOutcome(None, latency_s)
        job = _Job(
            request_id,
            self._clock(),
            {},
            dict(slices),
            self._stage,
            served_by,
            live,
            todo,
            nbytes,
            decode=decode,
            decode_offload=offload,
        )
        job.headers = context.client_headers.get()
        self._submit(job, other)

    def canary_failed(self, exc: BaseException, latency_s: float) -> CallOutcome:
        """The candidate failed a canary request it was to answer (pass-through): counted
        and logged as in :meth:`infer`; the champion answers and the pair records it."""
        failed = self._failed(exc, latency_s)
        self.breaker.record(False, failed.reason)
        self.metrics.shadow_failures.labels(reason=failed.reason or "error").inc()
        log.warning("candidate failed on a canary request; champion answers: %s", failed.error)
        return failed

    def _record_now(
        self,
        request_id: str,
        ts: float,
        inputs: dict[str, np.ndarray],
        slices: dict[str, str],
        stage: str,
        champion: CallOutcome,
        candidate: CallOutcome,
    ) -> None:
        """Both sides already computed (canary fallback): only the records remain."""
        job = _Job(request_id, ts, inputs, slices, stage, "champion", champion, None, 0)
        self._submit(job, other=candidate)

    def take(self, job: _Job, other: CallOutcome | None = None) -> None:
        """Mirrored work handed off by a live process (the shadow worker's intake)."""
        self._submit(job, other)

    def _submit(self, job: _Job, other: CallOutcome | None = None) -> None:
        if self.handoff is not None:
            self.handoff.submit(job, other)
            return
        if self._closing:
            self._drop("shutdown")
            return
        if other is not None:
            # Nothing to compute: build the records without taking a slot.
            self._start(job, other)
            return
        if len(self._tasks) < self._mirror.max_in_flight:
            self._start(job, None)
        elif len(self._queue) >= self._mirror.queue_size:
            self._skip(job.request_id, "queue_full")
        elif self._queued_bytes + job.nbytes > self._mirror.max_queue_bytes:
            self._skip(job.request_id, "queue_bytes")
        else:
            self._queue.append(job)
            self._queued_bytes += job.nbytes
            self.metrics.shadow_queue_depth.set(len(self._queue))

    def _drop(self, reason: str, n: int = 1) -> None:
        self.metrics.shadow_dropped.labels(reason=reason).inc(n)

    def _start(self, job: _Job, other: CallOutcome | None) -> None:
        task = asyncio.get_running_loop().create_task(self._run(job, other))
        # Strong reference until done: the loop keeps only weak ones.
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        self.metrics.shadow_in_flight.set(len(self._tasks))

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("mirror task failed", exc_info=task.exception())
        while self._queue and not self._stopped and len(self._tasks) < self._mirror.max_in_flight:
            job = self._queue.popleft()
            self._queued_bytes -= job.nbytes
            self._start(job, None)
        self.metrics.shadow_queue_depth.set(len(self._queue))
        self.metrics.shadow_in_flight.set(len(self._tasks))

    async def _run(self, job: _Job, other: CallOutcome | None) -> None:
        if job.decode is not None:
            try:
                if job.nbytes > OFFLOAD_BYTES or job.decode_offload:
                    await asyncio.to_thread(job.decode, job)
                else:
                    job.decode(job)
            except MirrorgateError as exc:
                # The champion answered the client; this pair cannot be built.
                self._drop("undecodable")
                log.warning("pair %s dropped: %s", job.request_id, exc.message)
                return
        if other is None and job.todo is not None:
            if job.todo == "candidate" and not self.breaker.allow():
                self._skip(job.request_id, "circuit_open")  # it opened while this job waited
                return
            other = await self._mirrored_call(job)
        assert other is not None
        if job.served_by == "champion":
            champion, candidate = job.live, other
        else:
            champion, candidate = other, job.live
        if job.nbytes > OFFLOAD_BYTES:
            records = await asyncio.to_thread(self.build_records, job, champion, candidate)
        else:
            records = self.build_records(job, champion, candidate)
        self._emit(records)

    async def _mirrored_call(self, job: _Job) -> CallOutcome:
        role = job.todo
        assert role is not None
        start = time.perf_counter()
        context.client_headers.set(job.headers)
        try:
            out = await self._call(
                role,
                job.inputs,
                job.outputs,
                min(self._shadow_timeout, self._timeouts[role]),
                job.request_id,
            )
        except asyncio.CancelledError:
            if role == "candidate":
                self.breaker.cancelled()
            raise
        except Exception as exc:
            failed = self._failed(exc, time.perf_counter() - start)
            assert failed.reason is not None
            if role == "candidate":
                self.breaker.record(False, failed.reason)
            self.metrics.shadow_failures.labels(reason=failed.reason).inc()
            return failed
        if role == "candidate":
            self.breaker.record(True)
        return CallOutcome(out, _latency_since(start))

    def _emit(self, records: list[PairRecord]) -> None:
        for record in records:
            for sink in self.sinks:
                try:
                    sink.submit(record)
                except Exception:  # a sink must never take the mirror down with it
                    log.exception("pair sink %r raised on submit", sink)

    # ----------------------------------------------------------------- records

    def pair_output(self, champion: CallOutcome, candidate: CallOutcome) -> str | None:
        """The output a pair compares: the configured one, else the first (champion's
        metadata order, then its answer's order) that both sides returned, else the
        first either side returned (the other side then records ``missing_output``)."""
        if self._config.output.output:
            return self._config.output.output
        ch, ca = champion.outputs or {}, candidate.outputs or {}
        order = [s.name for s in self.champion.metadata.outputs] + list(ch) + list(ca)
        for name in order:
            if name in ch and name in ca:
                return name
        for name in order:
            if name in ch or name in ca:
                return name
        return self.gated_output("champion")

    @staticmethod
    def _gated_array(name: str | None, outcome: CallOutcome) -> np.ndarray | None:
        if outcome.outputs is None:
            return None
        if name is None:
            return next(iter(outcome.outputs.values()), None)
        return outcome.outputs.get(name)

    def _row_result(
        self,
        name: str | None,
        outcome: CallOutcome,
        gated: np.ndarray | None,
        row: int | None,
        rows: int | None,
    ) -> ModelResult:
        latency_ms = outcome.latency_s * 1000.0
        if outcome.error is not None:
            return ModelResult(None, latency_ms, outcome.error)
        if gated is None:
            return ModelResult(None, latency_ms, f"missing_output: {name!r}")
        if rows is not None and (gated.ndim == 0 or gated.shape[0] != rows):
            got = gated.shape[0] if gated.ndim else 0
            return ModelResult(
                None, latency_ms, f"shape_mismatch: output has {got} rows for {rows} input rows"
            )
        value = gated if row is None else gated[row]
        # The output's descriptor travels with the record: the contract gate compares
        # name, datatype family and per-row shape between the two sides (docs/gates.md).
        name = name or self._first_output_name(outcome)
        datatype, shape = output_datatype(gated), tuple(int(d) for d in np.shape(value))
        if gated.dtype.kind in "OSU":  # BYTES: compared by exact match, kept as strings
            texts = [
                v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                for v in np.asarray(value, dtype=object).reshape(-1)
            ]
            strings = np.array(texts, dtype=object)
            return ModelResult(strings, latency_ms, None, name, datatype, shape)
        try:
            number = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            return ModelResult(None, latency_ms, "non_numeric_output: gated output is not numbers")
        if not np.isfinite(number).all():  # the method: no dispatch for a tiny array
            return ModelResult(None, latency_ms, "non_finite_output: NaN or infinity in output")
        number = number.reshape(-1)
        if self._task == "regression" and number.size == 1:
            number = number.reshape(())
        return ModelResult(number, latency_ms, None, name, datatype, shape)

    @staticmethod
    def _first_output_name(outcome: CallOutcome) -> str | None:
        return None if not outcome.outputs else next(iter(outcome.outputs))

    def _rows(
        self,
        inputs: Mapping[str, np.ndarray],
        champion: np.ndarray | None,
        candidate: np.ndarray | None,
    ) -> int | None:
        """Rows of a batched request, or None for a model without a batch axis.

        Batched when the inputs share a leading axis B and the reference output (the
        champion's, else the candidate's) has B rows too; with no output at all, when
        the champion's metadata declares a dynamic leading dimension.
        """
        rows = input_rows(inputs)
        if rows is None:
            return None
        specs = self.champion.metadata.inputs
        if specs and all(s.shape and s.shape[0] == -1 for s in specs):
            # Declared batched: a side whose output has another row count is then a
            # shape_mismatch, the champion's too (never a pair that looks successful).
            return rows
        reference = champion if champion is not None else candidate
        if reference is not None:
            return rows if reference.ndim and reference.shape[0] == rows else None
        return None

    def build_records(
        self, job: _Job, champion: CallOutcome, candidate: CallOutcome
    ) -> list[PairRecord]:
        """One PairRecord per row (ids ``<id>#<row>``; a single row keeps the id)."""
        name = self.pair_output(champion, candidate)
        ch_out = self._gated_array(name, champion)
        ca_out = self._gated_array(name, candidate)
        rows = self._rows(job.inputs, ch_out, ca_out)
        indices: list[int | None] = [None] if rows is None else list(range(rows))
        records: list[PairRecord] = []
        for row in indices:
            rid = job.request_id if rows is None or rows == 1 else f"{job.request_id}#{row}"
            features = self.slicer.row_features(job.inputs, row)
            slices = {**job.slices, **self.slicer.rule_slices(features, job.slices)}
            captured = None
            if self._capture:
                captured = {
                    n: np.array(a if row is None else a[row]) for n, a in job.inputs.items()
                }
            records.append(
                PairRecord(
                    id=rid,
                    ts=job.ts,
                    champion=self._row_result(name, champion, ch_out, row, rows),
                    candidate=self._row_result(name, candidate, ca_out, row, rows),
                    slices=slices,
                    features=dict(features),
                    inputs_digest=inputs_digest(job.inputs, row),
                    stage=job.stage,
                    served_by=job.served_by,
                    inputs=captured,
                )
            )
        self._count_output_faults(records)
        return records

    def _count_output_faults(self, records: list[PairRecord]) -> None:
        """Count candidate output faults (NaN, missing) once per request in the metric."""
        for record in records:
            error = record.candidate.error
            if error and error.split(":", 1)[0] in (
                "missing_output",
                "non_finite_output",
                "non_numeric_output",
                "shape_mismatch",
            ):
                self.metrics.shadow_failures.labels(reason=error.split(":", 1)[0]).inc()
                return

    # ----------------------------------------------------------------- shutdown

    async def drain(self, timeout_s: float) -> int:
        """Stop taking work, finish what is queued/in flight within ``timeout_s``.

        Returns how many mirrored requests were cut (counted as dropped, reason
        ``shutdown``).
        """
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        while self._tasks:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.wait(set(self._tasks), timeout=remaining)
        self._stopped = True
        cut = len(self._queue) + len(self._tasks)
        self._queue.clear()
        self._queued_bytes = 0
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if cut:
            self._drop("shutdown", cut)
            log.warning("shutdown cut %d mirrored requests after %.1f s", cut, timeout_s)
        self.metrics.shadow_queue_depth.set(0)
        self.metrics.shadow_in_flight.set(0)
        return cut
