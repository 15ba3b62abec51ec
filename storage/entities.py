"""Plain values the storage API takes and returns (the ORM rows stay inside ``storage``).

Times are epoch seconds (floats), as in ``PairRecord.ts``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from gates.records import Label, PairRecord

PinnedStatus = Literal["candidate", "pinned", "dismissed"]
PINNED_STATUSES: tuple[str, ...] = ("candidate", "pinned", "dismissed")
GateStatus = Literal["pass", "inconclusive", "fail"]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model's identity as a rollout records it: the fields of the proxy's
    ``ModelIdentity`` (``ModelInfo.of(backend.identity)``)."""

    name: str
    kind: str
    digest: str
    device: str = "cpu"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind, "digest": self.digest, "device": self.device}

    @classmethod
    def of(cls, identity: Any) -> ModelInfo:
        """From anything with name, kind, digest (and device): the proxy's ModelIdentity."""
        return cls(
            name=str(identity.name),
            kind=str(identity.kind),
            digest=str(identity.digest),
            device=str(getattr(identity, "device", "cpu")),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ModelInfo | None:
        if not data:
            return None
        return cls(
            name=str(data.get("name", "")),
            kind=str(data.get("kind", "")),
            digest=str(data.get("digest", "")),
            device=str(data.get("device", "cpu")),
        )


@dataclass(slots=True)
class Rollout:
    id: str
    champion: ModelInfo
    candidate: ModelInfo | None
    config_digest: str
    task: str
    created_at: float
    ended_at: float | None
    status: str  # active | promoted | aborted | ended
    stage: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class LabelEntry:
    """A received label; ``status`` pending | joined | orphaned."""

    request_id: str
    label: Label
    ts: float
    received_at: float
    status: str = "pending"
    joined_at: float | None = None
    source: str = "api"


@dataclass(frozen=True, slots=True)
class LabelCounts:
    pending: int
    joined: int
    orphaned: int


@dataclass(slots=True)
class GateEvaluation:
    gate: str
    status: str  # pass | inconclusive | fail
    statistic: float | None
    threshold: float | None
    n: int
    method: str
    ts: float
    slice: str = ""
    confidence: float | None = None
    details: dict[str, Any] | None = None
    rollout_id: str = ""


@dataclass(slots=True)
class Decision:
    verdict: str  # continue | promote | abort | pause | resume ...
    actor_kind: Literal["engine", "operator"]
    actor: str
    reason: str
    ts: float
    from_stage: str | None = None
    to_stage: str | None = None
    evidence: dict[str, Any] | None = None
    rollout_id: str = ""
    id: int = 0


@dataclass(slots=True)
class HarvestedCase:
    """What a harvest rule caught: the pair as evidence, plus what identifies the case."""

    task: str
    rule: str
    record: PairRecord
    inputs: dict[str, np.ndarray] | None = None
    rollout_id: str | None = None
    champion: ModelInfo | None = None
    candidate: ModelInfo | None = None


@dataclass(slots=True)
class PinnedCase:
    id: int
    task: str
    inputs_digest: str
    status: str  # candidate | pinned | dismissed
    rule: str
    evidence: PairRecord  # first occurrence: outputs, label, ts, slices, request id
    inputs: dict[str, np.ndarray] | None
    rollout_id: str | None
    champion: ModelInfo | None
    candidate: ModelInfo | None
    first_seen: float
    last_seen: float
    recurrence_count: int
    expected_label: Label
    score_tolerance: float | None
    updated_at: float


@dataclass(frozen=True, slots=True)
class HarvestResult:
    case_id: int
    created: bool  # False: an existing case recurred (its count went up)
    recurrence_count: int
    status: str


@dataclass(frozen=True, slots=True)
class TriageEntry:
    pinned_id: int
    actor: str
    reason: str
    from_status: str | None
    to_status: str
    expected_label: Label
    score_tolerance: float | None
    ts: float


@dataclass(frozen=True, slots=True)
class Baseline:
    id: int
    name: str
    data: dict[str, Any] | None
    actor: str
    reason: str
    ts: float
    rollout_id: str | None = None


@dataclass(frozen=True, slots=True)
class SignOff:
    rollout_id: str
    reviewer: str
    decision: str  # approve | reject
    report_digest: str
    note: str
    ts: float


@dataclass(frozen=True, slots=True)
class GateSnapshot:
    rollout_id: str
    replica_id: str
    window_start: float
    window_end: float
    state: dict[str, Any] | None
    ts: float


@dataclass(frozen=True, slots=True)
class PurgeResult:
    pairs: int = 0
    labels: int = 0
    gate_evaluations: int = 0
    gate_snapshots: int = 0
    orphaned_labels: int = 0  # labels newly marked orphaned (kept, reported)

    @property
    def total(self) -> int:
        return self.pairs + self.labels + self.gate_evaluations + self.gate_snapshots
