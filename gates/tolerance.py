"""Tolerance gate: label-free, per pair, an anytime-valid ceiling on out-of-tolerance rates.

Each check turns every comparable pair into a 0/1 "out of tolerance" indicator and bounds
its rate with the beta-binomial mixture e-process (exact for Bernoulli data, a function of
``(n, k)`` only): FAIL when the rate is confidently above ``max_rate``, PASS when it is
confidently below. Checks per task:

* classification: ``shift`` (largest |change| of any class probability > tol), ``flip``
  (top-1 class differs), ``collapse`` (champion top probability >= high while the
  candidate's is < low);
* regression: ``regression`` (``|cand - champ| > atol + rtol * |champ|``);
* embedding: ``cosine`` (cosine distance > tol).

Which checks run is decided by the output kind (gates/kinds.py): ``class_index`` has only
``flip``; ``multilabel`` has ``shift`` (largest change of any label's probability) and
``flip`` (any label's decision at 0.5 differs); ``vector_regression`` applies
``regression`` to every element (a row is out when any element is) and adds ``norm``
(``||cand - champ|| > atol + rtol * ||champ||``); ``string`` has ``mismatch`` (the strings
differ at all).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gates.batch import FloatArray, PairBatch, batch_kind
from gates.kinds import class_predictions, multilabel_decisions, softmax
from gates.result import GateResult, Method, fmt
from gates.settings import RateLimit
from gates.sliced import CheckSpec, SlicedGate, where

METHOD = Method(
    "beta-binomial mixture e-process",
    "Bernoulli rate of out-of-tolerance pairs; uniform-prior likelihood-ratio mixture, "
    "Ville's inequality: valid at every look",
)

_DESCRIPTIONS = {
    "shift": "pairs with a class probability moved by more than {tol}",
    "flip": "pairs whose top-1 class flipped",
    "collapse": "pairs where the champion is >= {high} sure and the candidate < {low}",
    "regression": "pairs with |candidate - champion| > {atol} + {rtol}*|champion|",
    "cosine": "pairs with cosine distance > {tol}",
    "norm": "pairs with ||candidate - champion|| > {atol} + {rtol}*||champion||",
    "mismatch": "pairs whose output strings differ",
}

TASK_CHECKS = {
    "classification": ("shift", "flip", "collapse"),
    "regression": ("regression",),
    "embedding": ("cosine",),
}

KIND_CHECKS = {
    "probabilities": ("shift", "flip", "collapse"),
    "logits": ("shift", "flip", "collapse"),
    "class_index": ("flip",),
    "multilabel": ("shift", "flip"),
    "scalar_regression": ("regression",),
    "vector_regression": ("regression", "norm"),
    "embedding": ("cosine",),
    "string": ("mismatch",),
}


class ToleranceGate(SlicedGate):
    family = "tolerance"

    @property
    def enabled(self) -> bool:
        return self.settings.tolerance.enabled

    @property
    def blocking(self) -> bool:
        return self.settings.tolerance.blocking

    @property
    def applicable(self) -> bool:
        return self.task == "auto" or bool(self._active())

    waiting_for = "no comparable pairs yet"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kind: str | None = None  # fixed by the first batch with outputs

    def _limits(self) -> dict[str, RateLimit]:
        t = self.settings.tolerance
        return {
            "shift": t.shift,
            "flip": t.flip,
            "collapse": t.collapse,
            "regression": t.regression,
            "cosine": t.cosine,
            "norm": t.norm,
            "mismatch": t.mismatch,
        }

    def _active(self) -> list[str]:
        limits = self._limits()
        checks = KIND_CHECKS[self.kind] if self.kind else TASK_CHECKS.get(self.task, ())
        return [c for c in checks if limits[c].enabled]

    def _update(self, batch: PairBatch) -> None:
        if not batch.comparable.any():
            return
        if self.kind is None:
            self.kind = batch_kind(batch, self.settings.kind, self.settings.kinds, self.task)
        mask = batch.comparable
        t = self.settings.tolerance
        out: dict[str, np.ndarray] = {}
        kind = self.kind
        if kind == "string":
            if batch.champion_text is None or batch.candidate_text is None:
                return
            out["mismatch"] = np.array(
                [a != b for a, b in zip(batch.champion_text, batch.candidate_text, strict=True)]
            )
            self._add_checks(batch, mask, out)
            return
        if batch.champion is None or batch.candidate is None:
            return
        if batch.champion.shape[1:] != batch.candidate.shape[1:]:
            return  # contract faults: counted by the contract gate, not comparable here
        ch = np.nan_to_num(batch.champion)
        ca = np.nan_to_num(batch.candidate)
        if kind == "class_index":
            out["flip"] = class_predictions(ch, kind) != class_predictions(ca, kind)
        elif kind == "multilabel":
            c, a = ch.reshape(batch.n, -1), ca.reshape(batch.n, -1)
            out["shift"] = np.abs(a - c).max(axis=1) > t.shift.tol
            out["flip"] = (multilabel_decisions(c) != multilabel_decisions(a)).any(axis=1)
        elif kind in ("vector_regression", "scalar_regression"):
            c, a = ch.reshape(batch.n, -1), ca.reshape(batch.n, -1)
            r = t.regression
            out["regression"] = np.asarray(
                (np.abs(a - c) > r.atol + r.rtol * np.abs(c)).any(axis=1)
            )
            dist = np.linalg.norm(a - c, axis=1)
            out["norm"] = np.asarray(dist > t.norm.atol + t.norm.rtol * np.linalg.norm(c, axis=1))
        elif kind in ("probabilities", "logits"):
            pc: FloatArray | None
            pa: FloatArray | None
            if kind == "logits":
                pc = softmax(ch.reshape(batch.n, -1))
                pa = softmax(ca.reshape(batch.n, -1))
            else:
                pc, pa = batch.probabilities("champion"), batch.probabilities("candidate")
            if pc is None or pa is None or pc.shape != pa.shape:
                return
            out["shift"] = np.abs(pa - pc).max(axis=1) > t.shift.tol
            out["flip"] = pa.argmax(axis=1) != pc.argmax(axis=1)
            out["collapse"] = (pc.max(axis=1) >= t.collapse.high) & (
                pa.max(axis=1) < t.collapse.low
            )
        elif kind == "embedding":
            c = ch.reshape(batch.n, -1)
            a = ca.reshape(batch.n, -1)
            norms = np.linalg.norm(c, axis=1) * np.linalg.norm(a, axis=1)
            cos = np.einsum("ij,ij->i", c, a) / np.where(norms > 0, norms, 1.0)
            out["cosine"] = (1.0 - np.where(norms > 0, cos, 1.0)) > t.cosine.tol
        self._add_checks(batch, mask, out)

    def _add_checks(self, batch: PairBatch, mask: np.ndarray, out: dict[str, np.ndarray]) -> None:
        assignment = self.cells.assign(batch, mask)
        ones = np.ones(batch.n)
        for check in self._active():
            if check in out:
                values: FloatArray = np.stack([ones, out[check].astype(np.float64)], axis=1)
                self._add(check, values, mask, assignment)

    def _compute(self) -> list[GateResult]:
        active = self._active()
        if not active:
            return []
        alpha_check = self.alpha / len(active)
        limits = self._limits()
        specs: list[tuple[str, CheckSpec]] = []
        for check in active:
            limit = limits[check]
            text = _DESCRIPTIONS[check].format(**limit.model_dump())
            if check == "regression" and self.kind == "vector_regression":
                text += " in any element"

            def describe(
                cell: str,
                n: float,
                est: float,
                word: str,
                phrase: str,
                text: str = text,
                max_rate: float = limit.max_rate,
            ) -> tuple[float, str, dict[str, Any]]:
                reason = (
                    f"{word}: rate of {text} on {where(cell)} is {fmt(est)} (n={int(n)}), "
                    f"{phrase} the limit {fmt(max_rate)}"
                )
                return est, reason, {"out_of_tolerance": round(est * n) if n else 0}

            spec = CheckSpec(
                name=f"tolerance.{check}",
                kind="rate",
                theta=limit.max_rate,
                bad="high",
                alpha=alpha_check,
                min_samples=self.settings.tolerance.min_samples,
                sliced=self._sliced(check),
                blocking=self.settings.tolerance.blocking,
                method=METHOD,
                describe=describe,
            )
            specs.append((check, spec))
        return self._results(specs)

    def _merge(self, other: ToleranceGate) -> None:
        if self.kind is None:
            self.kind = other.kind
        elif other.kind not in (None, self.kind):
            raise ValueError(f"tolerance: cannot merge kind {other.kind} into {self.kind}")
        self._merge_tables(other)

    def _state(self) -> dict[str, Any]:
        return {**self._tables_state(), "kind": self.kind}

    def _load(self, state: dict[str, Any]) -> None:
        self._load_tables(state)
        self.kind = state.get("kind")
