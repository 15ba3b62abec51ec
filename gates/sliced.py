"""Shared machinery of the sliced gates (tolerance, metric): per-check cell tables."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from gates.base import Bad, Decisions, Gate, Kind, decide
from gates.batch import BoolArray, FloatArray, IntArray
from gates.cells import CellTable, SliceCells
from gates.result import AGGREGATE, GateResult, Method, Status, fmt
from gates.settings import GatesSettings, Task
from gates.stats import binary_log_e, log_threshold

Assignment = list[tuple[list[str], IntArray]]


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """How one check's cells are decided and described."""

    name: str  # result name, e.g. "metric.accuracy"
    kind: Kind
    theta: float
    bad: Bad
    alpha: float  # the check's budget before the per-cell split
    min_samples: int
    sliced: bool
    blocking: bool
    method: Method
    # (cell, n, estimate, status word, phrase) -> (statistic, reason, details)
    describe: Callable[[str, float, float, str, str], tuple[float, str, dict[str, Any]]]
    lo: float = -1.0
    hi: float = 1.0
    # Cells that are not slices (per-class recall): the budget is split over this many,
    # fixed by the model's interface (number of classes), never by the data seen.
    cells_alloc: int | None = None


class SlicedGate(Gate):
    """A gate whose checks keep one :class:`CellTable` each (aggregate + slice cells)."""

    #: number of sums per cell: 2 for rates (n, k), 3 for means (n, sum, sum of squares)
    widths: dict[str, int] = {}

    def __init__(self, settings: GatesSettings, *, alpha: float, task: Task = "auto") -> None:
        super().__init__(settings, alpha=alpha, task=task)
        self.cells = SliceCells(settings.slices)
        self.tables: dict[str, CellTable] = {}

    def _table(self, check: str, width: int) -> CellTable:
        t = self.tables.get(check)
        if t is None:
            t = self.tables[check] = CellTable(width)
        return t

    def _sliced(self, check: str) -> bool:
        return self.settings.slices.enabled and check in self.settings.slices.checks

    def _add(
        self,
        check: str,
        values: FloatArray,
        mask: BoolArray,
        assignment: Assignment,
        *,
        cells: tuple[list[str], IntArray] | None = None,
        like: str | None = None,
    ) -> None:
        """Add rows ``values[mask]`` to the check's aggregate cell and its slice cells.

        ``cells`` replaces the aggregate + slices layout (per-class recall cells); ``like``
        slices this table as another check is sliced (display tables)."""
        table = self._table(check, values.shape[1])
        if cells is not None:
            names, codes = cells
            table.add_rows(np.where(mask, codes, -1), names, values)
            return
        table.add_total(AGGREGATE, values[mask])
        if self._sliced(like or check):
            for names, codes in assignment:
                table.add_rows(np.where(mask, codes, -1), names, values)

    def _merge_tables(self, other: SlicedGate) -> None:
        renames = self.cells.merge(other.cells)
        for check, table in other.tables.items():
            copy = CellTable.from_state(table.state(), table.width)
            copy.rename(renames)
            mine = self._table(check, table.width)
            mine.merge(copy)

    def _tables_state(self) -> dict[str, Any]:
        return {
            "cells": self.cells.state(),
            "tables": {k: {"width": t.width, **t.state()} for k, t in self.tables.items()},
        }

    def _load_tables(self, state: dict[str, Any]) -> None:
        self.cells.load(state.get("cells", {}))
        self.tables = {
            k: CellTable.from_state(v, int(v["width"])) for k, v in state.get("tables", {}).items()
        }

    def _merge(self, other: Self) -> None:
        self._merge_tables(other)

    # ------------------------------------------------------------------ results

    def _results(self, specs: list[tuple[str, CheckSpec]]) -> list[GateResult]:
        """All cells of all checks, decided with one vectorised call per e-process kind."""
        groups: dict[tuple[str, str, float, float], list[tuple[CheckSpec, CellTable]]] = {}
        for check, spec in specs:
            table = self.tables.get(check)
            if table is None or len(table) == 0:
                continue
            key = (spec.kind, spec.bad, spec.lo, spec.hi)
            groups.setdefault(key, []).append((spec, table))
        out: list[GateResult] = []
        for members in groups.values():
            rows, thetas, alphas, shares, pass_thetas, pass_alphas = [], [], [], [], [], []
            for spec, table in members:
                names = table.names
                # rates keep (n, k); a Bernoulli's sum of squares is its sum
                data = table.data if table.width > 2 else table.data[:, [0, 1, 1]]
                rows.append(data)
                theta = np.full(len(names), spec.theta)
                thetas.append(theta)
                if spec.cells_alloc is not None:
                    alphas.append(np.full(len(names), spec.alpha / max(spec.cells_alloc, 1)))
                else:
                    alphas.append(
                        np.array(
                            [self.cells.cell_alpha(spec.alpha, nm, spec.sliced) for nm in names]
                        )
                    )
                share, t_pass, al_pass = self._pass_limits(spec, table, theta)
                shares.append(share)
                pass_thetas.append(t_pass)
                pass_alphas.append(al_pass)
            data = np.vstack(rows)
            alpha = np.concatenate(alphas)
            share_all = np.concatenate(shares)
            theta_pass = np.concatenate(pass_thetas)
            first = members[0][0]
            d: Decisions = decide(
                first.kind,
                data[:, 0],
                data[:, 1],
                data[:, 2],
                np.concatenate(thetas),
                alpha,
                np.concatenate(pass_alphas),
                first.bad,
                first.lo,
                first.hi,
                theta_pass=theta_pass,
            )
            offset = 0
            for spec, table in members:
                names = table.names
                cells = [
                    self._cell_result(
                        spec,
                        cell,
                        data[offset + i],
                        d,
                        offset + i,
                        alpha[offset + i],
                        float(share_all[offset + i]),
                        float(theta_pass[offset + i]),
                    )
                    for i, cell in enumerate(names)
                ]
                # aggregate first, then slice cells by name: stable output for dashboards
                cells.sort(key=lambda r: (r.slice != AGGREGATE, r.slice))
                out.extend(cells)
                offset += len(names)
        return out

    def _pass_limits(
        self, spec: CheckSpec, table: CellTable, theta: FloatArray
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Per cell: traffic share, the limit a PASS is tested at, and its level.

        Slice cells of a non-inferiority check (paired differences, ``bad="low"``) PASS at
        a margin widened to ``margin / sqrt(U)``, ``U`` an anytime upper confidence bound of
        the cell's share of the check's traffic (``slices.pass_margin: sqrt_share``): a
        slice then needs about as many pairs of its own as the aggregate needs in all. The
        widened limit is never tighter than the limit at the true share while ``U`` covers
        it, so a PASS errs with probability at most ``0.8 alpha_pass`` (e-process) plus
        ``0.2 alpha_pass`` (share bound). FAIL is always tested at the configured limit.
        """
        sl = self.settings.slices
        a_pass = self.settings.alpha_pass
        names = table.names
        n = table.data[:, 0]
        total = float(table.row(AGGREGATE)[0])
        share = np.where(n > 0, n / max(total, 1.0), 0.0) if total > 0 else np.zeros(len(names))
        t_pass = theta.copy()
        al_pass = np.full(len(names), a_pass)
        if spec.cells_alloc is not None or not spec.sliced:
            return np.ones(len(names)), t_pass, al_pass
        is_slice = np.array([nm != AGGREGATE for nm in names])
        share = np.where(is_slice, share, 1.0)
        widen = (
            sl.pass_margin == "sqrt_share"
            and spec.kind == "ternary"
            and spec.bad == "low"
            and spec.theta < 0
        )
        if widen and is_slice.any() and total > 0:
            idx = np.flatnonzero(is_slice)
            t_pass[idx], al_pass[idx] = widened_pass_limit(spec.theta, n[idx], total, a_pass)
        return share, t_pass, al_pass

    def _cell_result(
        self,
        spec: CheckSpec,
        cell: str,
        row: FloatArray,
        d: Decisions,
        i: int,
        alpha: float,
        share: float = 1.0,
        theta_pass: float | None = None,
    ) -> GateResult:
        n, s1 = float(row[0]), float(row[1])
        sl = self.settings.slices
        min_n = spec.min_samples
        is_slice = cell != AGGREGATE and spec.cells_alloc is None
        if cell != AGGREGATE:
            min_n = max(min_n, sl.min_samples)
        enough = n >= min_n
        # Betting / mixture e-processes are valid from the first observation: a FAIL needs
        # no sample floor. The floor only delays a PASS.
        failed = bool(d.fail[i])
        passed = bool(d.passed[i]) and enough
        status = Status.FAIL if failed else Status.PASS if passed else Status.INCONCLUSIVE
        if is_slice:
            # not required to advance: a small slice, or slices not required at all
            optional = share < sl.require_share or not sl.require_pass
        else:
            optional = not enough
        optional = optional and not failed
        est = s1 / n if n > 0 else float("nan")
        if status is Status.INCONCLUSIVE and not enough:
            word = f"INCONCLUSIVE (n={int(n)} < {min_n} to PASS)"
        else:
            word = status.value
        stat, reason, details = spec.describe(cell, n, est, word, phrase(status, spec.bad, True))
        if is_slice and optional:
            reason += (
                f"; {fmt(share)} of the traffic, below require_share {fmt(sl.require_share)}: "
                "may FAIL, not required to PASS"
            )
        details = {
            **details,
            "alpha": float(alpha),
            "alpha_pass": float(self.settings.alpha_pass),
            "log_e_fail": float(d.log_e_fail[i]),
            "log_e_pass": float(d.log_e_pass[i]),
            "min_samples": min_n,
        }
        if is_slice:
            details["share"] = share
            details["required"] = not optional
            if theta_pass is not None and theta_pass != spec.theta:
                details["pass_threshold"] = theta_pass
        conf = 1.0 - (self.settings.alpha_pass if status is Status.PASS else float(alpha))
        return GateResult(
            name=spec.name,
            slice=cell,
            status=status,
            statistic=stat,
            threshold=spec.theta,
            n=int(n),
            confidence=conf,
            method=spec.method,
            reason=reason,
            blocking=spec.blocking,
            insufficient=optional,
            details=details,
            cs=d.cs.cell(i),
        )


def widened_pass_limit(
    theta: float, n_cell: FloatArray, total: FloatArray | float, alpha_pass: float
) -> tuple[FloatArray, FloatArray]:
    """A slice's PASS limit ``theta / sqrt(U)`` and the level its PASS is tested at.

    ``U`` is the upper end of an anytime confidence sequence for the slice's share of
    the check's traffic at ``0.2 alpha_pass``; the PASS e-process then runs at
    ``0.8 alpha_pass``, so a PASS errs with probability at most ``alpha_pass`` overall.
    """
    n_a, tot = np.broadcast_arrays(
        np.asarray(n_cell, dtype=np.float64), np.asarray(total, dtype=np.float64)
    )
    k, nn = n_a.ravel(), tot.ravel()
    # U: the smallest share p at which "share >= p" is rejected by the Bernoulli betting
    # e-process, searched on a grid that refines towards the observed share (one
    # vectorised call; the grid rounds U up, which only widens less: still valid)
    thr = float(log_threshold(0.2 * alpha_pass))
    est = np.where(nn > 0, k / np.maximum(nn, 1.0), 0.0)
    steps = 2.0 ** (-np.arange(48) / 4.0)  # 1 down to ~2.6e-4 of the room above est
    grid = est[:, None] + (1.0 - est)[:, None] * steps[None, :]
    rej = (
        binary_log_e(
            np.repeat(nn, len(steps)),
            np.repeat(k, len(steps)),
            np.clip(grid.ravel(), 1e-9, 1 - 1e-9),
            "less",
        ).reshape(grid.shape)
        >= thr
    )
    # rejection holds above U, so the last rejected grid point (steps fall) bounds U
    last = len(steps) - 1 - np.argmax(rej[:, ::-1], axis=1)
    hi = np.where(rej.any(axis=1), grid[np.arange(len(est)), last], 1.0)
    upper = np.clip(hi.reshape(n_a.shape), 1e-6, 1.0)
    limit = np.maximum(theta / np.sqrt(upper), -0.99)
    return limit, np.full(n_a.shape, 0.8 * alpha_pass)


def phrase(status: Status, bad: Bad, enough: bool) -> str:
    """How the estimate stands against the limit, in words."""
    if not enough:
        return "too few samples to decide against"
    if status is Status.INCONCLUSIVE:
        return "not yet distinguishable (anytime-valid) from"
    below = (status is Status.FAIL) == (bad == "low")
    return "confidently below" if below else "confidently above"


def where(cell: str) -> str:
    return "all traffic" if cell == AGGREGATE else cell
