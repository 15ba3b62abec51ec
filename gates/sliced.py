"""Shared machinery of the sliced gates (tolerance, metric): per-check cell tables."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from gates.base import Bad, Decisions, Gate, Kind, decide, status_of
from gates.batch import BoolArray, FloatArray, IntArray
from gates.cells import CellTable, SliceCells
from gates.result import AGGREGATE, GateResult, Method, Status
from gates.settings import GatesSettings, Task

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
            rows, thetas, alphas = [], [], []
            for spec, table in members:
                names = table.names
                # rates keep (n, k); a Bernoulli's sum of squares is its sum
                data = table.data if table.width > 2 else table.data[:, [0, 1, 1]]
                rows.append(data)
                thetas.append(np.full(len(names), spec.theta))
                if spec.cells_alloc is not None:
                    alphas.append(np.full(len(names), spec.alpha / max(spec.cells_alloc, 1)))
                else:
                    alphas.append(
                        np.array(
                            [self.cells.cell_alpha(spec.alpha, nm, spec.sliced) for nm in names]
                        )
                    )
            data = np.vstack(rows)
            alpha = np.concatenate(alphas)
            first = members[0][0]
            d: Decisions = decide(
                first.kind,
                data[:, 0],
                data[:, 1],
                data[:, 2],
                np.concatenate(thetas),
                alpha,
                self.settings.alpha_pass,
                first.bad,
                first.lo,
                first.hi,
            )
            offset = 0
            for spec, table in members:
                names = table.names
                cells = [
                    self._cell_result(
                        spec, cell, data[offset + i], d, offset + i, alpha[offset + i]
                    )
                    for i, cell in enumerate(names)
                ]
                # aggregate first, then slice cells by name: stable output for dashboards
                cells.sort(key=lambda r: (r.slice != AGGREGATE, r.slice))
                out.extend(cells)
                offset += len(names)
        return out

    def _cell_result(
        self, spec: CheckSpec, cell: str, row: FloatArray, d: Decisions, i: int, alpha: float
    ) -> GateResult:
        n, s1 = float(row[0]), float(row[1])
        min_n = spec.min_samples
        if cell != AGGREGATE:
            min_n = max(min_n, self.settings.slices.min_samples)
        enough = n >= min_n
        status = status_of(bool(d.fail[i]), bool(d.passed[i]), enough)
        est = s1 / n if n > 0 else float("nan")
        word = status.value if enough else f"INCONCLUSIVE (n={int(n)} < {min_n})"
        stat, reason, details = spec.describe(cell, n, est, word, phrase(status, spec.bad, enough))
        details = {
            **details,
            "alpha": float(alpha),
            "alpha_pass": self.settings.alpha_pass,
            "log_e_fail": float(d.log_e_fail[i]),
            "log_e_pass": float(d.log_e_pass[i]),
            "min_samples": min_n,
        }
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
            insufficient=not enough,
            details=details,
            cs=d.cs.cell(i),
        )


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
