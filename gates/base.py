"""The gate contract and the shared decision rule for one-sided anytime-valid tests.

Every gate:

* ``update(batch)`` folds a :class:`~gates.batch.PairBatch` (or a list of records) into its
  state and returns None; state is bounded (sums, counts, fixed histograms, capped cells);
* ``merge(other)`` / ``gate += other`` adds another state of the same gate: the merge of
  the states of two halves of a stream is the state of the whole stream;
* ``results`` (all cells) and ``result`` (the summary) are read-only views;
* ``state_dict()`` is plain JSON; ``Gate.from_state(state, settings, alpha=...)`` restores.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

import numpy as np

from gates.batch import FloatArray, PairBatch, as_batch, output_kind
from gates.records import PairRecord
from gates.result import AGGREGATE, GateResult, Method, Status
from gates.settings import GatesSettings, Task
from gates.stats import log_threshold, mean_cs, mean_log_e, rate_cs, rate_log_e, ternary_log_e

STATE_VERSION = 1


class Gate(ABC):
    """Base of every gate family (tolerance, metric, drift, latency, errors, pinned)."""

    family: ClassVar[str]
    #: True when the gate reads labelled records (``RolloutEngine.observe_labelled``).
    needs_labels: ClassVar[bool] = False

    def __init__(self, settings: GatesSettings, *, alpha: float, task: Task = "auto") -> None:
        self.settings = settings
        self.alpha = float(alpha)
        self.task: Task = settings.task if task == "auto" else task
        # results are cached per state version: bumped by every change of the state
        self._version = 0
        self._cache: tuple[int, list[GateResult]] | None = None

    # ------------------------------------------------------------------ contract

    @property
    def enabled(self) -> bool:
        """A disabled gate neither updates nor reports (and gets no error budget)."""
        return True

    def update(self, batch: PairBatch | Sequence[PairRecord]) -> None:
        if not self.enabled:
            return
        b = as_batch(batch)
        if b.n == 0:
            return
        self._resolve_task(b)
        self._update(b)
        self._version += 1

    @abstractmethod
    def _update(self, batch: PairBatch) -> None: ...

    def merge(self, other: Self) -> None:
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        if self.task == "auto":
            self.task = other.task
        elif other.task not in ("auto", self.task):
            raise ValueError(f"{self.family}: cannot merge task {other.task} into {self.task}")
        self._merge(other)
        self._version += 1

    @abstractmethod
    def _merge(self, other: Self) -> None: ...

    def __iadd__(self, other: Self) -> Self:
        self.merge(other)
        return self

    @property
    def results(self) -> list[GateResult]:
        """Every cell's result (cached until the state changes)."""
        if not self.enabled:
            return []
        if self._cache is None or self._cache[0] != self._version:
            computed = self._compute()
            if not computed and self.applicable:
                computed = [self._no_data()]
            self._cache = (self._version, computed)
        return list(self._cache[1])

    @property
    def blocking(self) -> bool:
        return True

    @property
    def applicable(self) -> bool:
        """False when the gate has no check for the task (e.g. metrics of embeddings)."""
        return True

    #: what the gate is waiting for before its first result
    waiting_for = "no data yet"

    def _no_data(self) -> GateResult:
        """An enabled gate without data is undecided, never absent: it holds a stage."""
        return GateResult(
            name=self.family,
            slice=AGGREGATE,
            status=Status.INCONCLUSIVE,
            statistic=None,
            threshold=None,
            n=0,
            confidence=0.0,
            method=Method("none", self.waiting_for),
            reason=f"INCONCLUSIVE: {self.family}: {self.waiting_for}",
            blocking=self.blocking,
            insufficient=True,
        )

    @abstractmethod
    def _compute(self) -> list[GateResult]: ...

    @property
    def result(self) -> GateResult:
        """Summary: the first blocking FAIL, else the first undecided cell, else PASS."""
        return summarize(self.family, self.results)

    def state_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "version": STATE_VERSION,
            "task": self.task,
            **self._state(),
        }

    @abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @classmethod
    def from_state(cls, state: dict[str, Any], settings: GatesSettings, *, alpha: float) -> Self:
        if state.get("family") != cls.family:
            raise ValueError(f"state of {state.get('family')!r} is not a {cls.family} state")
        gate = cls(settings, alpha=alpha, task=state.get("task", "auto"))
        gate._load(state)
        return gate

    @abstractmethod
    def _load(self, state: dict[str, Any]) -> None: ...

    # ------------------------------------------------------------------ helpers

    def _resolve_task(self, batch: PairBatch) -> None:
        if self.task != "auto":
            return
        kind = output_kind(batch.champion if batch.champion is not None else batch.candidate)
        if kind == "scalar":
            self.task = "regression"
        elif kind == "vector":
            self.task = "classification"


def summarize(family: str, results: list[GateResult]) -> GateResult:
    fails = [r for r in results if r.status is Status.FAIL and r.blocking]
    warns = [r for r in results if r.status is Status.FAIL and not r.blocking]
    open_ = [r for r in results if r.status is Status.INCONCLUSIVE and not r.exempt]
    if fails:
        pick, status = fails[0], Status.FAIL
    elif open_:
        pick, status = open_[0], Status.INCONCLUSIVE
    elif warns:
        pick, status = warns[0], Status.PASS
    elif results:
        pick, status = results[0], Status.PASS
    else:
        return GateResult(
            name=family,
            slice=AGGREGATE,
            status=Status.INCONCLUSIVE,
            statistic=None,
            threshold=None,
            n=0,
            confidence=0.0,
            method=Method("none", "no data yet"),
            reason=f"{family}: no data yet",
            insufficient=True,
        )
    return GateResult(
        name=family,
        slice=pick.slice,
        status=status,
        statistic=pick.statistic,
        threshold=pick.threshold,
        n=pick.n,
        confidence=pick.confidence,
        method=pick.method,
        reason=pick.reason,
        blocking=any(r.blocking for r in results),
        lower=pick.lower,
        upper=pick.upper,
        insufficient=pick.insufficient,
        details={"cells": len(results), "failing": len(fails), "warnings": len(warns)},
    )


# ------------------------------------------------------------------ one-sided decisions

Bad = Literal["low", "high"]
Kind = Literal["ternary", "mean", "rate"]


class LazyCS:
    """Confidence-sequence hulls of many cells, computed in one vectorised call on first use."""

    def __init__(
        self,
        kind: Kind,
        n: FloatArray,
        s1: FloatArray,
        s2: FloatArray,
        alpha_lower: FloatArray,
        alpha_upper: FloatArray,
        lo: float,
        hi: float,
    ) -> None:
        self._args = (kind, n, s1, s2, alpha_lower, alpha_upper, lo, hi)
        self._bounds: tuple[FloatArray, FloatArray] | None = None

    def bounds(self) -> tuple[FloatArray, FloatArray]:
        if self._bounds is None:
            kind, n, s1, s2, a_lo, a_up, lo, hi = self._args
            if kind == "rate":
                self._bounds = rate_cs(n, s1, a_lo, a_up)
            else:
                self._bounds = mean_cs(n, s1, s2, lo, hi, a_lo, a_up, ternary=kind == "ternary")
        return self._bounds

    def cell(self, i: int) -> Callable[[], tuple[float, float]]:
        def get() -> tuple[float, float]:
            lower, upper = self.bounds()
            return float(lower[i]), float(upper[i])

        return get


@dataclass(frozen=True, slots=True)
class Decisions:
    fail: np.ndarray
    passed: np.ndarray
    log_e_fail: FloatArray
    log_e_pass: FloatArray
    cs: LazyCS


def decide(
    kind: Kind,
    n: FloatArray,
    s1: FloatArray,
    s2: FloatArray | None,
    theta: float | FloatArray,
    alpha_fail: float | FloatArray,
    alpha_pass: float | FloatArray,
    bad: Bad,
    lo: float = -1.0,
    hi: float = 1.0,
    *,
    theta_pass: float | FloatArray | None = None,
) -> Decisions:
    """Anytime-valid FAIL / PASS per cell against the limit ``theta``.

    ``bad="low"``: FAIL when the mean is confidently below theta (non-inferiority margin),
    PASS when confidently above. ``bad="high"``: the mirror image (rates with a ceiling).
    ``kind`` picks the e-process: ``ternary`` (values in {-1,0,1}), ``mean`` (values in
    ``[lo, hi]``, Fan mixture) or ``rate`` (Bernoulli, ``s1`` = successes). The decision
    is the e-value at ``theta`` against ``1/alpha``; the CS hull is only for display.
    ``theta_pass`` (default ``theta``) is the limit the PASS side is tested at (a slice's
    widened promotion margin).
    """
    n = np.atleast_1d(np.asarray(n, dtype=np.float64))
    s1 = np.atleast_1d(np.asarray(s1, dtype=np.float64))
    s2a = np.atleast_1d(np.asarray(s2 if s2 is not None else s1, dtype=np.float64))
    fail_side: Literal["greater", "less"] = "greater" if bad == "high" else "less"
    pass_side: Literal["greater", "less"] = "less" if bad == "high" else "greater"

    def log_e(side: Literal["greater", "less"], th: float | FloatArray) -> FloatArray:
        if kind == "ternary":
            return ternary_log_e(n, s1, s2a, th, side)
        if kind == "rate":
            return rate_log_e(n, s1, th, side)
        return mean_log_e(n, s1, s2a, th, lo, hi, side)

    le_fail = np.atleast_1d(log_e(fail_side, theta))
    le_pass = np.atleast_1d(log_e(pass_side, theta if theta_pass is None else theta_pass))
    a_fail = np.broadcast_to(np.asarray(alpha_fail, dtype=np.float64), n.shape)
    a_pass = np.broadcast_to(np.asarray(alpha_pass, dtype=np.float64), n.shape)
    # hull of the confidence sequence: each side at the level of the decision it backs
    a_lower, a_upper = (a_fail, a_pass) if bad == "high" else (a_pass, a_fail)
    return Decisions(
        fail=le_fail >= log_threshold(a_fail),
        passed=le_pass >= log_threshold(a_pass),
        log_e_fail=le_fail,
        log_e_pass=le_pass,
        cs=LazyCS(kind, n, s1, s2a, a_lower, a_upper, lo, hi),
    )


def status_of(fail: bool, passed: bool, enough: bool) -> Status:
    if not enough:
        return Status.INCONCLUSIVE
    if fail:
        return Status.FAIL
    if passed:
        return Status.PASS
    return Status.INCONCLUSIVE
