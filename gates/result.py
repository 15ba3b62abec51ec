"""What a gate reports: status, statistic, threshold, n, confidence, method, reason."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    PASS = "PASS"
    INCONCLUSIVE = "INCONCLUSIVE"
    FAIL = "FAIL"

    @property
    def code(self) -> int:
        """Gauge value of ``mirrorgate_gate_status``: 0 pass, 1 inconclusive, 2 fail."""
        return {"PASS": 0, "INCONCLUSIVE": 1, "FAIL": 2}[self.value]


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    description: str


AGGREGATE = "*"


def _num(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True, slots=True)
class GateResult:
    """One check on one cell (``slice="*"`` is the whole traffic, else ``key=value``)."""

    name: str
    slice: str
    status: Status
    statistic: float | None
    threshold: float | None
    n: int
    confidence: float
    method: Method
    reason: str
    blocking: bool = True
    lower: float | None = None
    upper: float | None = None
    # True while a cell is below its minimum sample size: it neither fires nor blocks.
    insufficient: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    # Lazily computed anytime-valid CS hull (display only; decisions use e-values at the
    # threshold). Computed from numbers frozen at evaluation time, so it is a snapshot.
    cs: Callable[[], tuple[float, float]] | None = field(default=None, repr=False, compare=False)

    def interval(self) -> tuple[float | None, float | None]:
        if self.cs is not None:
            lo, hi = self.cs()
            return lo, hi
        return self.lower, self.upper

    @property
    def warning(self) -> bool:
        """A non-blocking FAIL: shown on the evidence, never aborts (e.g. input drift)."""
        return self.status is Status.FAIL and not self.blocking

    @property
    def exempt(self) -> bool:
        """A slice / class cell below its minimum sample size: it neither decides nor
        blocks advancing (the aggregate cell always counts)."""
        return self.insufficient and self.slice != AGGREGATE

    @property
    def label(self) -> str:
        return self.name if self.slice == AGGREGATE else f"{self.name}[{self.slice}]"

    def to_dict(self) -> dict[str, Any]:
        lower, upper = self.interval()
        return {
            "name": self.name,
            "slice": self.slice,
            "status": self.status.value,
            "statistic": _num(self.statistic),
            "threshold": _num(self.threshold),
            "n": int(self.n),
            "confidence": self.confidence,
            "method": self.method.name,
            "method_description": self.method.description,
            "reason": self.reason,
            "blocking": self.blocking,
            "warning": self.warning,
            "insufficient": self.insufficient,
            "lower": _num(lower),
            "upper": _num(upper),
            "details": {
                k: (_num(v) if isinstance(v, float) else v) for k, v in self.details.items()
            },
        }


def fmt(x: float | None, digits: int = 4) -> str:
    """Compact number for reasons: ``-0.0312``, ``inf``, ``n/a``."""
    if x is None:
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"
