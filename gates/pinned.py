"""Pinned gate: a candidate that gets a pinned failure wrong fails.

The pinned-failure set is a regression suite harvested from misclassifications (the
harvesting work fills it). Whoever runs the candidate on a pinned case reports the outcome
with :meth:`PinnedGate.record` (or ``RolloutEngine.pinned_result``). Deterministic: no
statistics, a wrong answer on a pinned case is a fact. State is one entry per case, bounded
by the size of the pinned set; the merge keeps the latest outcome per case (ties: a wrong
answer wins), so it is commutative.
"""

from __future__ import annotations

from typing import Any

from gates.base import Gate
from gates.batch import PairBatch
from gates.result import AGGREGATE, GateResult, Method, Status

METHOD = Method("pinned regression suite", "deterministic: each pinned case must stay correct")


class PinnedGate(Gate):
    family = "pinned"

    @property
    def enabled(self) -> bool:
        return self.settings.pinned.enabled

    @property
    def blocking(self) -> bool:
        return self.settings.pinned.blocking

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # case id -> (ts, correct, detail)
        self.cases: dict[str, tuple[float, bool, str]] = {}

    def record(self, case_id: str, correct: bool, *, ts: float, detail: str = "") -> None:
        cur = self.cases.get(case_id)
        new = (float(ts), bool(correct), detail)
        if cur is None or (new[0], not new[1]) > (cur[0], not cur[1]):
            self.cases[case_id] = new
            self._version += 1

    def _update(self, batch: PairBatch) -> None:
        """Pinned outcomes arrive through :meth:`record`, not with live pairs."""

    def _compute(self) -> list[GateResult]:
        cfg = self.settings.pinned
        if not cfg.enabled:
            return []
        n = len(self.cases)
        wrong = sorted(cid for cid, (_, ok, _) in self.cases.items() if not ok)
        if len(wrong) > cfg.max_failures:
            status = Status.FAIL
            shown = ", ".join(wrong[:5]) + (" ..." if len(wrong) > 5 else "")
            reason = (
                f"FAIL: candidate gets {len(wrong)} of {n} pinned failure cases wrong "
                f"(allowed {cfg.max_failures}): {shown}"
            )
        elif n >= cfg.min_cases:
            status = Status.PASS
            reason = (
                f"PASS: candidate gets {len(wrong)} of {n} pinned cases wrong "
                f"(allowed {cfg.max_failures})"
            )
        else:
            status = Status.INCONCLUSIVE
            reason = f"INCONCLUSIVE: {n} of the required {cfg.min_cases} pinned cases evaluated"
        return [
            GateResult(
                name="pinned",
                slice=AGGREGATE,
                status=status,
                statistic=float(len(wrong)),
                threshold=float(cfg.max_failures),
                n=n,
                confidence=1.0,
                method=METHOD,
                reason=reason,
                blocking=cfg.blocking,
                insufficient=status is Status.INCONCLUSIVE,
                details={"wrong": wrong[:50], "details": {c: self.cases[c][2] for c in wrong[:50]}},
            )
        ]

    def _merge(self, other: PinnedGate) -> None:
        for cid, (ts, ok, detail) in other.cases.items():
            self.record(cid, ok, ts=ts, detail=detail)

    def _state(self) -> dict[str, Any]:
        return {"cases": {k: list(v) for k, v in sorted(self.cases.items())}}

    def _load(self, state: dict[str, Any]) -> None:
        self.cases = {
            k: (float(v[0]), bool(v[1]), str(v[2])) for k, v in state.get("cases", {}).items()
        }
