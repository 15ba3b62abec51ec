"""Seeded traffic scenarios for the demo: requests with slice headers, labels that arrive later.

Pure and deterministic: a :class:`ScenarioSettings` and the held-out pool give the same
requests and labels on every machine. Nothing here sends anything; the demo (or a test)
walks :meth:`Traffic.events` and POSTs each :class:`DemoRequest` to
``/v2/models/{m}/infer`` and each :class:`LabelBatch` to ``/v1/feedback``.

The model of the traffic (docs/demo.md):

- each request comes from one platform, drawn from ``platform_mix`` (the slice, sent as
  ``X-Mirrorgate-Slice-platform``) and carries 1..k rows (``rows_per_request``: a scanned
  form has several handwritten fields); each row is an independent draw, with
  replacement, from the held-out pool's captures on that platform, so within a slice the
  pairs are i.i.d. — what the gates' anytime-valid guarantees assume;
- arrivals are a Poisson process at ``rate_rps`` (``t`` in seconds from the start), for a
  paced run; an unpaced run just keeps the order;
- each row gets its true label with probability ``label_rate`` (users confirm or correct
  a reading, or do not), ``delay`` requests later, geometric with mean
  ``label_delay_requests``, delivered in batches every ``feedback_every`` requests (a
  labelling service posts what it has collected); labels still pending at the end arrive
  after the last request.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import numpy as np

from proxy.demo.assets import INPUT_NAME, DemoPool, load_pool

SLICE_KEY = "platform"
SLICE_HEADER = f"X-Mirrorgate-Slice-{SLICE_KEY}"
REQUEST_ID_HEADER = "X-Request-Id"
PRODUCTION_MIX: Mapping[str, float] = MappingProxyType({"web": 0.6, "mobile": 0.2, "tablet": 0.2})


def _frozen(mapping: Mapping[Any, float]) -> Mapping[Any, float]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, slots=True)
class ScenarioSettings:
    """One traffic scenario. Validated on construction (ValueError naming the field)."""

    name: str
    requests: int
    seed: int = 0
    platform_mix: Mapping[str, float] = field(default_factory=lambda: PRODUCTION_MIX)
    rows_per_request: Mapping[int, float] = field(default_factory=lambda: _frozen({1: 1.0}))
    label_rate: float = 0.8
    label_delay_requests: float = 50.0
    feedback_every: int = 1  # labels are delivered in batches every this many requests
    rate_rps: float = 200.0
    id_prefix: str = "demo"

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise ValueError("requests: must be >= 1")
        _check_weights("platform_mix", self.platform_mix)
        _check_weights("rows_per_request", self.rows_per_request)
        if any(not isinstance(k, int) or k < 1 for k in self.rows_per_request):
            raise ValueError("rows_per_request: keys must be integers >= 1")
        if not 0.0 < self.label_rate <= 1.0:
            raise ValueError("label_rate: must lie in (0, 1]")
        if self.label_delay_requests < 1.0:
            raise ValueError("label_delay_requests: must be >= 1")
        if self.feedback_every < 1:
            raise ValueError("feedback_every: must be >= 1")
        if self.rate_rps <= 0:
            raise ValueError("rate_rps: must be > 0")
        if not self.id_prefix or "#" in self.id_prefix:
            raise ValueError("id_prefix: must be non-empty and free of '#'")
        object.__setattr__(self, "platform_mix", _frozen(self.platform_mix))
        object.__setattr__(self, "rows_per_request", _frozen(self.rows_per_request))

    @property
    def mean_rows_per_request(self) -> float:
        total = sum(self.rows_per_request.values())
        return sum(k * w for k, w in self.rows_per_request.items()) / total

    @property
    def expected_rows(self) -> float:
        return self.requests * self.mean_rows_per_request


def _check_weights(name: str, weights: Mapping[Any, float]) -> None:
    if not weights:
        raise ValueError(f"{name}: must not be empty")
    if any(not np.isfinite(w) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"{name}: weights must be finite, >= 0 and not all zero")


# Sized with proxy.demo.sizing and checked by benchmarks/demo_sizing.py (docs/demo.md,
# "How much traffic the gates need"): both modes carry enough labelled mobile pairs for a
# paired non-inferiority gate with margin 0.02 at alpha 0.05 (Bonferroni over 4 gates, two
# sides) to FAIL the regressed candidate and PASS the good one on every platform.
# "fast" packs rows into fewer HTTP requests (forms of several fields) to keep CI short.
FAST = ScenarioSettings(
    name="fast",
    requests=1500,
    rows_per_request={4: 0.25, 8: 0.5, 16: 0.25},
    label_delay_requests=20.0,
    feedback_every=25,
    rate_rps=500.0,
)
FULL = ScenarioSettings(
    name="full",
    requests=5000,
    rows_per_request={1: 0.4, 2: 0.2, 4: 0.3, 8: 0.1},
    label_delay_requests=100.0,
    feedback_every=20,
    rate_rps=300.0,
)
SCENARIOS: Mapping[str, ScenarioSettings] = MappingProxyType({"fast": FAST, "full": FULL})


def scenario(
    mode: str, *, seed: int | None = None, id_prefix: str | None = None
) -> ScenarioSettings:
    """The ``fast`` (CI) or ``full`` (demo) scenario, optionally re-seeded / re-prefixed."""
    try:
        base = SCENARIOS[mode]
    except KeyError:
        known = sorted(SCENARIOS)
        raise ValueError(f"unknown scenario {mode!r}; expected one of {known}") from None
    changes: dict[str, Any] = {}
    if seed is not None:
        changes["seed"] = seed
    if id_prefix is not None:
        changes["id_prefix"] = id_prefix
    return replace(base, **changes) if changes else base


def record_ids(request_id: str, n_rows: int) -> tuple[str, ...]:
    """Record ids of a request's rows (gates.records: B == 1 keeps the request id)."""
    if n_rows == 1:
        return (request_id,)
    return tuple(f"{request_id}#{k}" for k in range(n_rows))


@dataclass(frozen=True, slots=True)
class DemoRequest:
    """One inference request of the scenario."""

    seq: int
    id: str
    t: float  # seconds from the scenario's start (Poisson arrivals at rate_rps)
    platform: str
    pool_rows: tuple[int, ...]  # rows of the held-out pool it carries
    features: np.ndarray  # float32 [B, 64]
    labels: tuple[int, ...]  # ground truth of each row (sent later, if at all)

    @property
    def record_ids(self) -> tuple[str, ...]:
        return record_ids(self.id, len(self.pool_rows))

    @property
    def slices(self) -> dict[str, str]:
        return {SLICE_KEY: self.platform}

    @property
    def headers(self) -> dict[str, str]:
        return {REQUEST_ID_HEADER: self.id, SLICE_HEADER: self.platform}

    def infer_body(self, input_name: str = INPUT_NAME) -> dict[str, Any]:
        """The Open Inference Protocol JSON body of this request."""
        return {
            "id": self.id,
            "inputs": [
                {
                    "name": input_name,
                    "shape": list(self.features.shape),
                    "datatype": "FP32",
                    "data": self.features.ravel().tolist(),
                }
            ],
        }


@dataclass(frozen=True, slots=True)
class DemoLabel:
    """A row's true label, delivered just before request ``due_seq`` (or after the last)."""

    id: str  # the record id (``<request id>#<row>`` or the request id)
    label: int
    request_seq: int
    due_seq: int
    t: float

    def feedback(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label}


@dataclass(frozen=True, slots=True)
class LabelBatch:
    """Labels that arrive together: one ``POST /v1/feedback`` with a list body."""

    due_seq: int
    t: float
    labels: tuple[DemoLabel, ...]

    def feedback_body(self) -> list[dict[str, Any]]:
        return [label.feedback() for label in self.labels]


@dataclass(frozen=True, slots=True)
class TrafficSummary:
    requests: int
    rows: int
    labels: int
    rows_per_platform: dict[str, int]
    labels_per_platform: dict[str, int]
    duration_s: float  # the paced schedule's length

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "rows": self.rows,
            "labels": self.labels,
            "rows_per_platform": dict(self.rows_per_platform),
            "labels_per_platform": dict(self.labels_per_platform),
            "duration_s": self.duration_s,
        }


class Traffic:
    """A materialised scenario: all draws happen here, once, from ``settings.seed``."""

    def __init__(self, settings: ScenarioSettings, pool: DemoPool | None = None) -> None:
        self.settings = settings
        self.pool = pool if pool is not None else load_pool()
        unknown = set(settings.platform_mix) - set(self.pool.platforms)
        if unknown:
            raise ValueError(f"platform_mix: unknown platforms {sorted(unknown)}")
        rng = np.random.default_rng(settings.seed)
        n = settings.requests
        platforms = list(settings.platform_mix)
        mix = np.array([settings.platform_mix[p] for p in platforms], dtype=np.float64)
        sizes = np.array(list(settings.rows_per_request), dtype=np.int64)
        size_w = np.array(list(settings.rows_per_request.values()), dtype=np.float64)

        req_platform = rng.choice(len(platforms), size=n, p=mix / mix.sum())
        req_rows = rng.choice(sizes, size=n, p=size_w / size_w.sum())
        # Microsecond clock: arrivals strictly ordered, and still distinct once added to
        # an epoch timestamp (a float64 near 1.7e9 resolves ~0.24 us).
        gaps = np.maximum(np.round(rng.exponential(1.0 / settings.rate_rps, size=n), 6), 1e-6)
        gaps[0] = 0.0
        self._t = np.cumsum(gaps)

        total = int(req_rows.sum())
        row_req = np.repeat(np.arange(n), req_rows)
        row_platform = req_platform[row_req]
        pool_row = np.empty(total, dtype=np.int64)
        uniform = rng.random(total)
        for k, name in enumerate(platforms):
            candidates = self.pool.rows_of(name)
            sel = row_platform == k
            pool_row[sel] = candidates[(uniform[sel] * candidates.size).astype(np.int64)]
        labelled = rng.random(total) < settings.label_rate
        delay = rng.geometric(1.0 / settings.label_delay_requests, size=total)
        every = settings.feedback_every
        arrives = row_req + delay

        self._req_platform = [platforms[i] for i in req_platform]
        self._starts = np.concatenate([[0], np.cumsum(req_rows)])
        self._pool_row = pool_row
        self._row_req = row_req
        self._labelled = labelled
        # Delivered with the next feedback batch: at the first multiple of ``every``.
        self._due = -(-arrives // every) * every

    # -- requests -------------------------------------------------------------------

    def request_id(self, seq: int) -> str:
        return f"{self.settings.id_prefix}-{seq:06d}"

    def request(self, seq: int) -> DemoRequest:
        lo, hi = int(self._starts[seq]), int(self._starts[seq + 1])
        rows = self._pool_row[lo:hi]
        return DemoRequest(
            seq=seq,
            id=self.request_id(seq),
            t=float(self._t[seq]),
            platform=self._req_platform[seq],
            pool_rows=tuple(int(r) for r in rows),
            features=self.pool.features[rows],
            labels=tuple(int(v) for v in self.pool.labels[rows]),
        )

    def requests(self) -> Iterator[DemoRequest]:
        for seq in range(self.settings.requests):
            yield self.request(seq)

    def __len__(self) -> int:
        return self.settings.requests

    # -- labels ---------------------------------------------------------------------

    def _due_t(self, due_seq: int) -> float:
        n = self.settings.requests
        if due_seq < n:
            return float(self._t[due_seq])
        return float(self._t[-1]) + (due_seq - n + 1) / self.settings.rate_rps

    def labels(self) -> list[DemoLabel]:
        """Every label that will arrive, in arrival order (then by record)."""
        rows = np.flatnonzero(self._labelled)
        order = rows[np.argsort(self._due[rows], kind="stable")]
        out = []
        for row in order:
            seq = int(self._row_req[row])
            lo, hi = int(self._starts[seq]), int(self._starts[seq + 1])
            rid = record_ids(self.request_id(seq), hi - lo)[int(row) - lo]
            due = int(self._due[row])
            out.append(
                DemoLabel(
                    id=rid,
                    label=int(self.pool.labels[self._pool_row[row]]),
                    request_seq=seq,
                    due_seq=due,
                    t=self._due_t(due),
                )
            )
        return out

    # -- the merged stream ------------------------------------------------------------

    def events(self) -> Iterator[DemoRequest | LabelBatch]:
        """Requests and label batches in arrival order: labels due at request k come
        just before it; labels due after the last request come at the end."""
        pending = self.labels()
        i = 0
        for req in self.requests():
            batch = []
            while i < len(pending) and pending[i].due_seq <= req.seq:
                batch.append(pending[i])
                i += 1
            if batch:
                yield LabelBatch(due_seq=req.seq, t=batch[0].t, labels=tuple(batch))
            yield req
        while i < len(pending):
            due = pending[i].due_seq
            batch = []
            while i < len(pending) and pending[i].due_seq == due:
                batch.append(pending[i])
                i += 1
            yield LabelBatch(due_seq=due, t=batch[0].t, labels=tuple(batch))

    def summary(self) -> TrafficSummary:
        names = self.pool.platforms
        platform_of_row = self.pool.platform[self._pool_row]
        rows_pp = {p: int((platform_of_row == k).sum()) for k, p in enumerate(names)}
        labels_pp = {
            p: int(((platform_of_row == k) & self._labelled).sum()) for k, p in enumerate(names)
        }
        return TrafficSummary(
            requests=self.settings.requests,
            rows=int(self._pool_row.size),
            labels=int(self._labelled.sum()),
            rows_per_platform=rows_pp,
            labels_per_platform=labels_pp,
            duration_s=float(self._t[-1]),
        )
