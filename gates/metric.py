"""Metric gate: champion versus candidate on the same labelled requests (paired).

Blocking checks are means of per-request paired differences, so their state is
``(n, sum, sum of squares)`` per cell and the decision is an anytime-valid
non-inferiority test (FAIL when the candidate is worse than the margin with confidence,
PASS when it is no worse than the margin with confidence):

* ``accuracy``: ``d = cand_correct - champ_correct`` in {-1, 0, 1} (only discordant pairs
  carry information, as in McNemar's test) - betting e-process on the counts;
* ``recall``: the same ``d`` restricted to requests whose label is class c, one cell per
  class;
* ``high_confidence_error``: ``d = champ_hc_error - cand_hc_error`` where an hc error is a
  wrong answer given with top probability >= ``confidence``;
* regression ``mae`` / ``rmse``: ``z = (1+r)*min(|e_champ|, clip) - min(|e_cand|, clip)``
  (squares for rmse), bounded by the clip, Fan-mixture e-process; FAIL when the clipped
  candidate error is confidently above (1+r) times the champion's.

Labels are matched to the output kind (gates/kinds.py): a class id for ``probabilities``,
``logits`` and ``class_index`` (accuracy and per-class recall; the high-confidence error
rate needs scores, so not for class indices), a 0/1 vector for ``multilabel`` and a string
for ``string`` (accuracy = exact match of the whole label set / string), a number for
``scalar_regression`` and a vector of the output's width for ``vector_regression`` (the
row's error is its root-mean-square error over the elements; MAE and RMSE of that).
``embedding`` outputs have no labelled metric.

Evidence only, never blocking: ``macro_f1``, ``precision`` (macro) and ``ece`` are ratios of
sums over the whole sample, not means of per-request terms, so no per-request martingale
exists for them; they are reported as point estimates against their margins.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gates.base import status_of
from gates.batch import (
    FloatArray,
    PairBatch,
    batch_kind,
    class_labels,
)
from gates.kinds import (
    SCORED,
    class_predictions,
    multilabel_decisions,
    string_labels,
    vector_labels,
)
from gates.result import AGGREGATE, GateResult, Method, Status, fmt
from gates.settings import GatesSettings
from gates.sliced import CheckSpec, SlicedGate, where

PAIRED = Method(
    "paired betting e-process",
    "per-request paired difference in {-1,0,1}; mixture of betting martingales over a "
    "fixed grid, Ville's inequality: valid at every look; non-inferiority margin",
)
PAIRED_BOUNDED = Method(
    "paired bounded-mean e-process",
    "per-request paired difference of clipped errors; Fan-inequality mixture e-process, "
    "Ville's inequality: valid at every look",
)
EVIDENCE = Method(
    "point estimate (evidence only)",
    "ratio of sums over the labelled sample; no anytime-valid test, never blocking",
)

MAX_CONFUSION_CLASSES = 256


def check_alpha(
    settings: GatesSettings, family_alpha: float, active: list[str], check: str
) -> float:
    """One metric check's level: the family's budget split over its *blocking* checks by
    their ``alpha_weight`` (equal at the defaults).

    A check that cannot abort (``high_confidence_error`` under the ``retrained`` preset)
    takes no share of the false-abort budget; its evidence is tested at its own stated
    level, its weighted share among all active checks (what it would get if every check
    blocked)."""
    m = settings.metric
    weight = {c: float(getattr(m, c).alpha_weight) for c in active}
    blocking = [c for c in active if m.blocking and getattr(m, c).blocking]
    if check in blocking:
        return family_alpha * weight[check] / sum(weight[c] for c in blocking)
    total = sum(weight.values())
    return family_alpha * weight.get(check, 1.0) / total if total > 0 else family_alpha


class MetricGate(SlicedGate):
    family = "metric"

    @property
    def enabled(self) -> bool:
        return self.settings.metric.enabled

    @property
    def blocking(self) -> bool:
        return self.settings.metric.blocking

    @property
    def applicable(self) -> bool:
        return self.task == "auto" or bool(self._active())

    waiting_for = "no labelled pairs yet"

    needs_labels = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.n_classes: int | None = None
        self.unusable = 0  # labelled rows that could not be used (bad label, bad output)
        self.clip: float | None = self.settings.metric.clip
        self.calibration: list[float] = []
        self.confusion: dict[str, FloatArray] = {}
        self.calib: dict[str, FloatArray] = {}
        self.kind: str | None = None  # fixed by the first labelled batch with outputs

    # ------------------------------------------------------------------ update

    def _update(self, batch: PairBatch) -> None:
        if self.kind is None and batch.comparable.any():
            self.kind = batch_kind(batch, self.settings.kind, self.settings.kinds, self.task)
        kind = self.kind
        if kind == "string":
            self._update_exact(batch)
            return
        if batch.champion is None or batch.candidate is None or kind is None:
            self.unusable += batch.n
            return
        if batch.champion.shape[1:] != batch.candidate.shape[1:]:
            self.unusable += batch.n  # contract faults: the contract gate counts them
            return
        if kind in SCORED:
            self._update_classification(batch)
        elif kind == "class_index":
            self._update_class_index(batch)
        elif kind == "multilabel":
            self._update_exact(batch)
        elif kind in ("scalar_regression", "vector_regression"):
            self._update_regression(batch)
        else:
            self.unusable += batch.n  # embeddings: no labelled metric

    def _add_correct(
        self,
        batch: PairBatch,
        mask: np.ndarray,
        ok_c: FloatArray,
        ok_a: FloatArray,
        recall: tuple[list[str], np.ndarray] | None = None,
    ) -> None:
        """Accuracy (and per-class recall) from each model's 0/1 correctness per row."""
        m = self.settings.metric
        d = ok_a - ok_c
        ones = np.ones(batch.n)
        tern = np.stack([ones, d, d * d], axis=1)
        parts = np.stack([ones, ok_c, ok_a], axis=1)
        assignment = self.cells.assign(batch, mask)
        if m.accuracy.enabled:
            self._add("accuracy", tern, mask, assignment)
            self._add("accuracy_parts", parts, mask, assignment, like="accuracy")
        if m.recall.enabled and recall is not None:
            self._add("recall", tern, mask, assignment, cells=recall)
            self._add("recall_parts", parts, mask, assignment, cells=recall)

    def _update_class_index(self, batch: PairBatch) -> None:
        """One class id per row: accuracy and recall; the class count is not in the
        output, so class ids up to ``recall.max_classes`` get their own recall cell."""
        assert batch.champion is not None and batch.candidate is not None
        cap = self.settings.metric.recall.max_classes
        if self.n_classes is None:
            self.n_classes = cap
        y = class_labels(batch.raw_labels(), 1 << 62)
        mask = batch.comparable & (y >= 0)
        self.unusable += int(batch.n - mask.sum())
        if not mask.any():
            return
        pred_c = class_predictions(np.nan_to_num(batch.champion), "class_index")
        pred_a = class_predictions(np.nan_to_num(batch.candidate), "class_index")
        ok_c = (pred_c == y).astype(np.float64)
        ok_a = (pred_a == y).astype(np.float64)
        names = [f"class={k}" for k in range(cap - 1)] + ["class=__other__"]
        codes = np.minimum(np.where(mask, y, 0), cap - 1)
        self._add_correct(batch, mask, ok_c, ok_a, recall=(names, codes))
        c = cap
        yc = np.where(mask, np.minimum(y, c - 1), 0)
        for role, pred in (("champion", pred_c), ("candidate", pred_a)):
            p = np.clip(pred[mask], 0, c - 1)
            flat = np.bincount(yc[mask] * c + p, minlength=c * c).astype(float)
            cur = self.confusion.get(role)
            self.confusion[role] = flat if cur is None else cur + flat

    def _update_exact(self, batch: PairBatch) -> None:
        """String outputs and multi-label sets: correct when the whole answer matches."""
        raw = batch.raw_labels()
        if self.kind == "string":
            if batch.champion_text is None or batch.candidate_text is None:
                self.unusable += batch.n
                return
            ys = string_labels(raw)
            mask = batch.comparable & np.array([v is not None for v in ys], dtype=bool)
            ok_c = np.array([a == b for a, b in zip(batch.champion_text, ys, strict=True)])
            ok_a = np.array([a == b for a, b in zip(batch.candidate_text, ys, strict=True)])
        else:
            assert batch.champion is not None and batch.candidate is not None
            width = batch.champion.reshape(batch.n, -1).shape[1]
            yv = vector_labels(raw, width)
            mask = batch.comparable & np.isfinite(yv).all(axis=1)
            truth = np.nan_to_num(yv) >= 0.5
            ok_c = (multilabel_decisions(np.nan_to_num(batch.champion)) == truth).all(axis=1)
            ok_a = (multilabel_decisions(np.nan_to_num(batch.candidate)) == truth).all(axis=1)
        self.unusable += int(batch.n - mask.sum())
        if mask.any():
            self._add_correct(batch, mask, ok_c.astype(np.float64), ok_a.astype(np.float64))

    def _update_classification(self, batch: PairBatch) -> None:
        m = self.settings.metric
        assert batch.champion is not None and batch.candidate is not None
        pc, pa = batch.probabilities("champion"), batch.probabilities("candidate")
        if pc is None or pa is None or pc.shape != pa.shape:
            self.unusable += batch.n
            return
        c = pc.shape[1]
        if self.n_classes is None:
            self.n_classes = c
        elif self.n_classes != c:
            self.unusable += batch.n
            return
        y = class_labels(batch.raw_labels(), c)
        mask = batch.comparable & (y >= 0)
        self.unusable += int(batch.n - mask.sum())
        if not mask.any():
            return
        yc = np.where(mask, y, 0)
        pred_c, pred_a = pc.argmax(axis=1), pa.argmax(axis=1)
        ok_c = (pred_c == yc).astype(np.float64)
        ok_a = (pred_a == yc).astype(np.float64)
        d = ok_a - ok_c
        ones = np.ones(batch.n)
        tern = np.stack([ones, d, d * d], axis=1)
        assignment = self.cells.assign(batch, mask)
        if m.accuracy.enabled:
            self._add("accuracy", tern, mask, assignment)
            self._add(
                "accuracy_parts",
                np.stack([ones, ok_c, ok_a], axis=1),
                mask,
                assignment,
                like="accuracy",
            )
        if m.recall.enabled:
            cap = m.recall.max_classes
            names = [f"class={k}" for k in range(min(c, cap - 1))]
            if c > cap - 1:
                names.append("class=__other__")
            codes = np.minimum(yc, len(names) - 1)
            self._add("recall", tern, mask, assignment, cells=(names, codes))
            parts = np.stack([ones, ok_c, ok_a], axis=1)
            self._add("recall_parts", parts, mask, assignment, cells=(names, codes))
        top_c, top_a = pc.max(axis=1), pa.max(axis=1)
        if m.high_confidence_error.enabled:
            conf = m.high_confidence_error.confidence
            hc_c = ((top_c >= conf) & (ok_c == 0)).astype(np.float64)
            hc_a = ((top_a >= conf) & (ok_a == 0)).astype(np.float64)
            z = hc_c - hc_a
            self._add("high_confidence_error", np.stack([ones, z, z * z], axis=1), mask, assignment)
            self._add(
                "high_confidence_error_parts",
                np.stack([ones, hc_c, hc_a], axis=1),
                mask,
                assignment,
                like="high_confidence_error",
            )
        if c <= MAX_CONFUSION_CLASSES:
            for role, pred in (("champion", pred_c), ("candidate", pred_a)):
                flat = np.bincount(yc[mask] * c + pred[mask], minlength=c * c).astype(float)
                cur = self.confusion.get(role)
                self.confusion[role] = flat if cur is None else cur + flat
        bins = m.ece.bins
        for role, top, ok in (("champion", top_c, ok_c), ("candidate", top_a, ok_a)):
            b = np.minimum((top[mask] * bins).astype(np.int64), bins - 1)
            stats = np.stack(
                [
                    np.bincount(b, minlength=bins).astype(float),
                    np.bincount(b, weights=top[mask], minlength=bins),
                    np.bincount(b, weights=ok[mask], minlength=bins),
                ],
                axis=1,
            )
            cur = self.calib.get(role)
            self.calib[role] = stats if cur is None else cur + stats

    def _update_regression(self, batch: PairBatch) -> None:
        m = self.settings.metric
        assert batch.champion is not None and batch.candidate is not None
        ch = np.nan_to_num(batch.champion).reshape(batch.n, -1)
        ca = np.nan_to_num(batch.candidate).reshape(batch.n, -1)
        width = ch.shape[1]
        y = vector_labels(batch.raw_labels(), width)
        mask = batch.comparable & np.isfinite(y).all(axis=1)
        self.unusable += int(batch.n - mask.sum())
        if not mask.any():
            return
        # the row's error: |e| for a scalar, the root-mean-square over a vector's elements
        yn = np.nan_to_num(y)
        e_c = np.sqrt(np.mean((ch - yn) ** 2, axis=1))
        e_a = np.sqrt(np.mean((ca - yn) ** 2, axis=1))
        if self.clip is None:
            # Calibrate the clip on the first labelled pairs; they are then not tested, so
            # the bound is fixed before the data it is applied to.
            idx = np.flatnonzero(mask)
            need = m.clip_calibration - len(self.calibration)
            take = idx[:need]
            self.calibration.extend(float(v) for v in e_c[take])
            mask = mask.copy()
            mask[take] = False
            if len(self.calibration) >= m.clip_calibration:
                q = float(np.quantile(self.calibration, 0.99))
                self.clip = 10.0 * q if q > 0 else max(10.0 * max(self.calibration), 1e-9)
            if self.clip is None or not mask.any():
                return
        clip = self.clip
        assert clip is not None
        cc, ca = np.minimum(e_c, clip), np.minimum(e_a, clip)
        ones = np.ones(batch.n)
        assignment = self.cells.assign(batch, mask)
        if m.mae.enabled:
            z = (1.0 + m.mae.margin) * cc - ca
            self._add("mae", np.stack([ones, z, z * z], axis=1), mask, assignment)
            self._add("mae_parts", np.stack([ones, cc, ca], axis=1), mask, assignment, like="mae")
        if m.rmse.enabled:
            z = (1.0 + m.rmse.margin) ** 2 * cc * cc - ca * ca
            self._add("rmse", np.stack([ones, z, z * z], axis=1), mask, assignment)
            self._add(
                "rmse_parts",
                np.stack([ones, cc * cc, ca * ca], axis=1),
                mask,
                assignment,
                like="rmse",
            )

    # ------------------------------------------------------------------ results

    def _parts(self, check: str, cell: str) -> tuple[float, float]:
        table = self.tables.get(f"{check}_parts")
        if table is None:
            return float("nan"), float("nan")
        n, a, b = table.row(cell)
        return (a / n, b / n) if n > 0 else (float("nan"), float("nan"))

    def _active(self) -> list[str]:
        m = self.settings.metric
        if self.kind in ("string", "multilabel"):
            checks: dict[str, Any] = {"accuracy": m.accuracy}
        elif self.kind == "class_index":
            checks = {"accuracy": m.accuracy, "recall": m.recall}
        elif self.kind == "embedding":
            return []
        elif self.task == "classification" and self.kind not in (
            "scalar_regression",
            "vector_regression",
        ):
            checks = {
                "accuracy": m.accuracy,
                "recall": m.recall,
                "high_confidence_error": m.high_confidence_error,
            }
        elif self.task == "regression" or self.kind in ("scalar_regression", "vector_regression"):
            checks = {"mae": m.mae, "rmse": m.rmse}
        else:
            return []
        return [k for k, v in checks.items() if v.enabled]

    def _compute(self) -> list[GateResult]:
        active = self._active()
        if not active:
            return []
        specs = [
            (c, spec)
            for c in active
            if (spec := self._spec(c, check_alpha(self.settings, self.alpha, active, c)))
            is not None
        ]
        out = self._results(specs)
        if self.task == "classification" and self.kind in (None, *SCORED, "class_index"):
            out.extend(self._evidence())
        return out

    def _spec(self, check: str, alpha: float) -> CheckSpec | None:
        m = self.settings.metric
        gate_blocking = m.blocking

        if check in ("accuracy", "recall", "high_confidence_error"):
            cfg = getattr(m, check)
            label = {
                "accuracy": "accuracy",
                "recall": "recall",
                "high_confidence_error": "high-confidence error rate",
            }[check]

            def describe(
                cell: str, n: float, est: float, word: str, phrase: str
            ) -> tuple[float, str, dict[str, Any]]:
                champ, cand = self._parts(check, cell)
                if check == "high_confidence_error":
                    diff = "champion - candidate hc error rate"
                else:
                    diff = f"candidate - champion {label}"
                reason = (
                    f"{word}: {diff} on {where(cell)} is {fmt(est)} (n={int(n)}; champion "
                    f"{fmt(champ)}, candidate {fmt(cand)}), {phrase} the margin "
                    f"{fmt(-cfg.margin)}"
                )
                return est, reason, {"champion": champ, "candidate": cand}

            cells_alloc = None
            if check == "recall":
                cells_alloc = min(self.n_classes or 2, m.recall.max_classes)
            return CheckSpec(
                name=f"metric.{check}",
                kind="ternary",
                theta=-cfg.margin,
                bad="low",
                alpha=alpha,
                min_samples=m.min_samples,
                sliced=check != "recall" and self._sliced(check),
                blocking=gate_blocking and cfg.blocking,
                method=PAIRED,
                describe=describe,
                cells_alloc=cells_alloc,
            )
        if check in ("mae", "rmse") and self.clip is not None:
            cfg = getattr(m, check)
            r = cfg.margin
            clip = self.clip
            if check == "mae":
                lo, hi = -clip, (1.0 + r) * clip
            else:
                lo, hi = -clip * clip, (1.0 + r) ** 2 * clip * clip

            def describe_reg(
                cell: str, n: float, est: float, word: str, phrase: str
            ) -> tuple[float, str, dict[str, Any]]:
                champ, cand = self._parts(check, cell)
                if check == "rmse":
                    champ, cand = float(np.sqrt(champ)), float(np.sqrt(cand))
                reason = (
                    f"{word}: clipped {check.upper()} on {where(cell)}: candidate "
                    f"{fmt(cand)} vs champion {fmt(champ)} x {fmt(1 + r)} "
                    f"(paired statistic {fmt(est)}, n={int(n)}, clip {fmt(clip)}), {phrase} 0"
                )
                return est, reason, {"champion": champ, "candidate": cand, "clip": clip}

            return CheckSpec(
                name=f"metric.{check}",
                kind="mean",
                theta=0.0,
                bad="low",
                alpha=alpha,
                min_samples=m.min_samples,
                sliced=self._sliced(check),
                blocking=gate_blocking and cfg.blocking,
                method=PAIRED_BOUNDED,
                describe=describe_reg,
                lo=lo,
                hi=hi,
            )
        return None

    def _evidence(self) -> list[GateResult]:
        m = self.settings.metric
        out: list[GateResult] = []
        conf_c, conf_a = self.confusion.get("champion"), self.confusion.get("candidate")
        c = self.n_classes or 0
        if conf_c is not None and conf_a is not None and c:
            n = int(conf_c.sum())
            mc, ma = conf_c.reshape(c, c), conf_a.reshape(c, c)

            def per_class(mat: FloatArray) -> tuple[float, float]:
                tp = np.diag(mat)
                pred, true = mat.sum(axis=0), mat.sum(axis=1)
                seen = (pred + true) > 0
                f1 = np.where(seen, 2 * tp / np.maximum(pred + true, 1), 0.0)
                prec_seen = pred > 0
                prec = np.where(prec_seen, tp / np.maximum(pred, 1), 0.0)
                macro_f1 = float(f1[seen].mean()) if seen.any() else float("nan")
                macro_p = float(prec[prec_seen].mean()) if prec_seen.any() else float("nan")
                return macro_f1, macro_p

            f1_c, p_c = per_class(mc)
            f1_a, p_a = per_class(ma)
            if m.macro_f1.enabled:
                out.append(
                    self._evidence_result("macro_f1", "macro F1", n, f1_c, f1_a, m.macro_f1.margin)
                )
            if m.precision.enabled:
                out.append(
                    self._evidence_result(
                        "precision", "macro precision", n, p_c, p_a, m.precision.margin
                    )
                )
        cal_c, cal_a = self.calib.get("champion"), self.calib.get("candidate")
        if m.ece.enabled and cal_c is not None and cal_a is not None:

            def ece(stats: FloatArray) -> float:
                cnt = stats[:, 0]
                total = cnt.sum()
                if total <= 0:
                    return float("nan")
                gap = np.abs(stats[:, 2] - stats[:, 1])  # |sum correct - sum confidence|
                return float(gap.sum() / total)

            n = int(cal_c[:, 0].sum())
            e_c, e_a = ece(cal_c), ece(cal_a)
            out.append(
                self._evidence_result(
                    "ece", "expected calibration error", n, e_c, e_a, m.ece.margin, higher=True
                )
            )
        return out

    def _evidence_result(
        self,
        check: str,
        label: str,
        n: int,
        champ: float,
        cand: float,
        margin: float,
        *,
        higher: bool = False,
    ) -> GateResult:
        """Point-estimate comparison: ``higher`` means a larger value is worse (ECE)."""
        min_n = self.settings.metric.min_samples
        diff = cand - champ
        threshold = margin if higher else -margin
        bad = diff > threshold if higher else diff < threshold
        status = status_of(bool(bad), not bool(bad), n >= min_n and np.isfinite(diff))
        word = status.value if n >= min_n else f"INCONCLUSIVE (n={n} < {min_n})"
        if status is Status.FAIL:
            word = "WARNING"
        reason = (
            f"{word}: candidate - champion {label} is {fmt(diff)} (champion {fmt(champ)}, "
            f"candidate {fmt(cand)}, n={n}) against {fmt(threshold)}; evidence only"
        )
        return GateResult(
            name=f"metric.{check}",
            slice=AGGREGATE,
            status=status,
            statistic=diff,
            threshold=threshold,
            n=n,
            confidence=0.0,
            method=EVIDENCE,
            reason=reason,
            blocking=False,
            insufficient=n < min_n,
            details={"champion": champ, "candidate": cand},
        )

    # ------------------------------------------------------------------ state

    def _merge(self, other: MetricGate) -> None:
        if self.kind is None:
            self.kind = other.kind
        elif other.kind not in (None, self.kind):
            raise ValueError(f"metric: cannot merge kind {other.kind} into {self.kind}")
        if self.n_classes is None:
            self.n_classes = other.n_classes
        elif other.n_classes not in (None, self.n_classes):
            raise ValueError("metric: cannot merge states with different class counts")
        if self.clip is None and other.clip is not None:
            if self.calibration:
                raise ValueError("metric: cannot merge a calibrating state into a calibrated one")
            self.clip = other.clip
        elif other.clip is not None and other.clip != self.clip:
            raise ValueError("metric: cannot merge states with different error clips")
        elif self.clip is None and other.clip is None:
            self.calibration.extend(other.calibration)
        self._merge_tables(other)
        self.unusable += other.unusable
        for mine, theirs in ((self.confusion, other.confusion), (self.calib, other.calib)):
            for role, arr in theirs.items():
                cur = mine.get(role)
                mine[role] = arr.copy() if cur is None else cur + arr

    def _state(self) -> dict[str, Any]:
        return {
            **self._tables_state(),
            "n_classes": self.n_classes,
            "kind": self.kind,
            "unusable": self.unusable,
            "clip": self.clip,
            "calibration": list(self.calibration),
            "confusion": {k: v.tolist() for k, v in self.confusion.items()},
            "calib": {k: v.tolist() for k, v in self.calib.items()},
        }

    def _load(self, state: dict[str, Any]) -> None:
        self._load_tables(state)
        self.n_classes = state.get("n_classes")
        self.kind = state.get("kind")
        self.unusable = int(state.get("unusable", 0))
        self.clip = state.get("clip")
        self.calibration = [float(v) for v in state.get("calibration", [])]
        self.confusion = {
            k: np.asarray(v, dtype=float) for k, v in state.get("confusion", {}).items()
        }
        self.calib = {
            k: np.asarray(v, dtype=float).reshape(-1, 3) for k, v in state.get("calib", {}).items()
        }
