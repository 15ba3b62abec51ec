"""Output contract gate: the candidate's gated output must look like the champion's.

Per pair where the champion answered: the output is present on the candidate's side
under the same name, of the same datatype family (float / integer / bool / bytes), with
the same per-row shape (so the same class count). A pair that breaks this is a candidate
output fault (``PairBatch.contract_fault``; it also counts as a candidate error in the
errors gate). The rate of such pairs is bounded with the beta-binomial mixture e-process
(exact for Bernoulli data, valid at every look): FAIL when it is confidently above
``max_rate``, which with every pair broken takes a handful of pairs; PASS when it is
confidently below. The gate is blocking and evaluated first: an incomparable candidate
can never pass by being silently skipped.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gates.base import Gate, decide, status_of
from gates.batch import PairBatch
from gates.result import AGGREGATE, GateResult, Method, fmt
from gates.sliced import phrase

METHOD = Method(
    "beta-binomial mixture e-process",
    "Bernoulli rate of pairs whose candidate output breaks the champion's contract "
    "(name, datatype family, per-row shape); Ville's inequality: valid at every look",
)


class ContractGate(Gate):
    family = "contract"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.n = 0  # pairs where the champion answered (the contract is judged)
        self.k = 0  # ... whose candidate output broke it
        self.example: tuple[str, str, str] | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.contract.enabled

    @property
    def blocking(self) -> bool:
        return self.settings.contract.blocking

    waiting_for = "no pair with a champion output yet"

    def _update(self, batch: PairBatch) -> None:
        judged = batch.observed & ~batch.champion_error
        self.n += int(judged.sum())
        self.k += int((batch.contract_fault & judged).sum())
        if self.example is None and batch.contract_example is not None:
            self.example = batch.contract_example

    def _compute(self) -> list[GateResult]:
        if self.n == 0:
            return []
        c = self.settings.contract
        d = decide(
            "rate",
            np.array([self.n], dtype=float),
            np.array([self.k], dtype=float),
            None,
            c.max_rate,
            self.alpha,
            self.settings.alpha_pass,
            "high",
        )
        enough = self.n >= c.min_samples
        fail, passed = bool(d.fail[0]), bool(d.passed[0])
        status = status_of(fail, passed, enough)
        rate = self.k / self.n
        reason = (
            f"{status.value}: {self.k} of {self.n} pairs broke the output contract "
            f"(rate {fmt(rate)}), {phrase(status, 'high', enough)} the limit {fmt(c.max_rate)}"
        )
        details: dict[str, Any] = {
            "violations": self.k,
            "alpha": self.alpha,
            "alpha_pass": self.settings.alpha_pass,
            "min_samples": c.min_samples,
            "log_e_fail": float(d.log_e_fail[0]),
            "log_e_pass": float(d.log_e_pass[0]),
        }
        if self.example is not None:
            why, champ, cand = self.example
            reason += f"; first: {why} (champion {champ}, candidate {cand})"
            details.update({"first_violation": why, "champion": champ, "candidate": cand})
        return [
            GateResult(
                name="contract",
                slice=AGGREGATE,
                status=status,
                statistic=rate,
                threshold=c.max_rate,
                n=self.n,
                confidence=1.0 - (self.settings.alpha_pass if passed and not fail else self.alpha),
                method=METHOD,
                reason=reason,
                blocking=self.blocking,
                insufficient=not enough,
                details=details,
                cs=d.cs.cell(0),
            )
        ]

    def _merge(self, other: ContractGate) -> None:
        self.n += other.n
        self.k += other.k
        if self.example is None:
            self.example = other.example

    def _state(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "k": self.k,
            "example": None if self.example is None else list(self.example),
        }

    def _load(self, state: dict[str, Any]) -> None:
        self.n = int(state.get("n", 0))
        self.k = int(state.get("k", 0))
        ex = state.get("example")
        self.example = None if ex is None else (str(ex[0]), str(ex[1]), str(ex[2]))
