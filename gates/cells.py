"""Named cells of sufficient statistics, and the slice cells every sliced check shares.

A *cell* is the aggregate (``"*"``) or one slice value (``"platform=mobile"``). Its state
is a short row of float64 sums, so two states combine by adding rows with the same name:
the merge of two replicas' states is the state of their union (exactly, while the slice
caps are not exceeded; beyond them the extra values are folded into ``key=__other__``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gates.batch import BoolArray, FloatArray, IntArray, PairBatch
from gates.result import AGGREGATE
from gates.settings import SliceSettings

OTHER = "__other__"


class CellTable:
    """Cells by name, each a row of ``width`` float64 sums (counts are exact below 2**53)."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        self.data: FloatArray = np.zeros((0, width))

    def __len__(self) -> int:
        return len(self.names)

    def ids(self, names: list[str]) -> IntArray:
        new = [nm for nm in dict.fromkeys(names) if nm not in self._index]
        if new:
            for nm in new:
                self._index[nm] = len(self.names)
                self.names.append(nm)
            self.data = np.vstack([self.data, np.zeros((len(new), self.width))])
        return np.array([self._index[nm] for nm in names], dtype=np.int64)

    def add_total(self, name: str, values: FloatArray) -> None:
        """Add the column sums of ``values`` (rows x width) to one cell."""
        i = int(self.ids([name])[0])
        self.data[i] += values.sum(axis=0)

    def add_rows(self, local: IntArray, local_names: list[str], values: FloatArray) -> None:
        """Add row ``r`` of ``values`` to cell ``local_names[local[r]]`` (skip ``local<0``)."""
        keep = local >= 0
        if not keep.any():
            return
        ids = self.ids(local_names)
        target = ids[local[keep]]
        vals = values[keep]
        size = len(self.names)
        for col in range(self.width):
            self.data[:, col] += np.bincount(target, weights=vals[:, col], minlength=size)

    def row(self, name: str) -> FloatArray:
        i = self._index.get(name)
        return np.zeros(self.width) if i is None else self.data[i]

    def merge(self, other: CellTable) -> None:
        if other.width != self.width:
            raise ValueError("cannot merge cell tables of different widths")
        ids = self.ids(other.names)
        if len(ids):
            np.add.at(self.data, ids, other.data)

    def rename(self, renames: Mapping[str, str | None]) -> None:
        """Fold cells into others (``old -> new``) or drop them (``old -> None``)."""
        if not any(nm in self._index for nm in renames):
            return
        old_names, old_data = self.names, self.data
        self.names, self._index, self.data = [], {}, np.zeros((0, self.width))
        targets = [renames.get(nm, nm) for nm in old_names]
        keep = [i for i, t in enumerate(targets) if t is not None]
        names = [targets[i] for i in keep]
        ids = self.ids([t for t in names if t is not None])
        np.add.at(self.data, ids, old_data[keep])

    def state(self) -> dict[str, Any]:
        return {"names": list(self.names), "data": self.data.tolist()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], width: int) -> CellTable:
        table = cls(width)
        names = list(state.get("names", []))
        data = np.asarray(state.get("data", []), dtype=np.float64).reshape(len(names), width)
        table.ids(names)
        table.data = data.copy()
        return table


class SliceCells:
    """Which ``key=value`` cell each row of a batch belongs to, under the caps.

    Keys: the configured ones, or (``keys: null``) the first ``max_keys`` keys seen.
    Values: the first ``max_values - 1`` values of a key get their own cell; later ones
    share ``key=__other__``. The caps fix the multiplicity budget before any data
    arrives, so the per-cell error levels never depend on what the traffic turns out to be.
    """

    def __init__(self, settings: SliceSettings) -> None:
        self.settings = settings
        self.keys: list[str] = list(settings.keys or [])
        self.values: dict[str, list[str]] = {k: [] for k in self.keys}

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    @property
    def alloc_keys(self) -> int:
        """Keys the budget is split over (fixed before any data)."""
        return len(self.settings.keys) if self.settings.keys is not None else self.settings.max_keys

    def cell_alpha(self, alpha_check: float, cell: str, sliced: bool) -> float:
        """Bonferroni share of one check's budget for one cell."""
        if not (sliced and self.enabled):
            return alpha_check
        if cell == AGGREGATE:
            return alpha_check * (1.0 - self.settings.alpha_share)
        share = alpha_check * self.settings.alpha_share
        return share / (max(self.alloc_keys, 1) * self.settings.max_values)

    def _admit_key(self, key: str) -> bool:
        if key in self.values:
            return True
        if self.settings.keys is not None or len(self.keys) >= self.settings.max_keys:
            return False
        self.keys.append(key)
        self.values[key] = []
        return True

    def _cell(self, key: str, value: str) -> str:
        vals = self.values[key]
        if value in vals:
            return f"{key}={value}"
        if len(vals) < self.settings.max_values - 1 and value != OTHER:
            vals.append(value)
            return f"{key}={value}"
        return f"{key}={OTHER}"

    def assign(self, batch: PairBatch, rows: BoolArray) -> list[tuple[list[str], IntArray]]:
        """Per admitted key: (cell names, per-row index into them, -1 = no cell).

        Only values of the contributing ``rows`` are admitted, so the cells (and the caps)
        depend on the data counted, never on how the stream was cut into batches."""
        if not self.enabled or not rows.any():
            return []
        out: list[tuple[list[str], IntArray]] = []
        for key, (values, codes) in batch.slices.items():
            used = np.unique(codes[rows & (codes >= 0)])
            if len(used) == 0 or not self._admit_key(key):
                continue
            # first-appearance order among contributing rows keeps admission order-stable
            first = np.array([np.argmax(rows & (codes == u)) for u in used])
            used = used[np.argsort(first, kind="stable")]
            remap = np.full(len(values), -1, dtype=np.int64)
            remap[used] = np.arange(len(used))
            names = [self._cell(key, values[u]) for u in used]
            out.append((names, np.where(codes >= 0, remap[np.maximum(codes, 0)], -1)))
        return out

    def merge(self, other: SliceCells) -> dict[str, str | None]:
        """Union of keys and values under the caps; returns the cell renames to apply."""
        renames: dict[str, str | None] = {}
        for key in other.keys:
            if not self._admit_key(key):
                for v in [*other.values[key], OTHER]:
                    renames[f"{key}={v}"] = None
                continue
            for v in other.values[key]:
                cell = self._cell(key, v)
                if cell != f"{key}={v}":
                    renames[f"{key}={v}"] = cell
        return renames

    def state(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "values": {k: list(v) for k, v in self.values.items()}}

    def load(self, state: Mapping[str, Any]) -> None:
        self.keys = list(state.get("keys", []))
        self.values = {k: list(v) for k, v in state.get("values", {}).items()}
        for k in self.keys:
            self.values.setdefault(k, [])
