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


def cell_weight(index: int, spread: int) -> float:
    """Share of the slices' budget for the ``index``-th slice cell admitted (1-based).

    ``(spread + 1) / ((index + spread) * (index + spread + 1))`` telescopes to a total of
    exactly 1 over all indices, so however many cells turn up, the cells admitted never
    spend more than the budget; the weight is fixed when the cell first appears (it is a
    function of how many cells came before it), so it is predictable and the union bound
    holds over a random number of cells. Larger ``spread`` levels the weights (the 1st
    cell gets ``1/(spread+2)``, the 20th about ``(spread+1)/(20+spread)^2``)."""
    k = index + spread
    return (spread + 1) / (k * (k + 1))


class SliceCells:
    """Which ``key=value`` cell each row of a batch belongs to, under the caps.

    Keys: the configured ones, or (``keys: null``) the first ``max_keys`` keys seen.
    Values: the first ``max_values`` values of a key get their own cell when they first
    appear. Past that, a new value is counted (exactly, up to ``max_tracked`` values per
    key) and its rows share ``key=__other__`` until its count reaches ``admit_min`` and
    ``admit_share`` of the key's counted traffic; from the row where it does, it has a
    cell of its own (up to ``max_admitted`` such cells per key). So a value with enough
    traffic is never folded into ``__other__`` for good, however many rare values came
    first. The decision uses only the slice labels of rows already counted (predictable),
    and the new cell's e-process starts at that row, so it is as valid as a cell created
    at first appearance. Error budget: the slices' share of a check's budget is spent cell
    by cell in order of creation (:func:`cell_weight`), so a 3-value key is not charged
    for 20 placeholder slots, and the split never depends on data not yet seen.
    """

    def __init__(self, settings: SliceSettings) -> None:
        self.settings = settings
        self.keys: list[str] = list(settings.keys or [])
        self.values: dict[str, list[str]] = {k: [] for k in self.keys}
        # every slice cell in order of creation: its budget weight's index
        self.order: dict[str, int] = {}
        # per key: counted rows, and the counts of values waiting for a cell of their own
        self.key_n: dict[str, int] = {k: 0 for k in self.keys}
        self.pending: dict[str, dict[str, int]] = {k: {} for k in self.keys}

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def cell_alpha(self, alpha_check: float, cell: str, sliced: bool) -> float:
        """Bonferroni share of one check's budget for one cell (0 for a cell not admitted)."""
        if not (sliced and self.enabled):
            return alpha_check
        if cell == AGGREGATE:
            return alpha_check * (1.0 - self.settings.alpha_share)
        index = self.order.get(cell)
        if index is None:
            return 0.0
        return alpha_check * self.settings.alpha_share * cell_weight(index, self.settings.spread)

    def register(self, cell: str) -> str:
        if cell not in self.order:
            self.order[cell] = len(self.order) + 1
        return cell

    def _admit_key(self, key: str) -> bool:
        if key in self.values:
            return True
        if self.settings.keys is not None or len(self.keys) >= self.settings.max_keys:
            return False
        self.keys.append(key)
        self.values[key] = []
        self.key_n.setdefault(key, 0)
        self.pending.setdefault(key, {})
        return True

    def _cell(self, key: str, value: str) -> str:
        vals = self.values[key]
        if value in vals:
            return f"{key}={value}"
        if len(vals) < self.settings.max_values and value != OTHER:
            vals.append(value)
            return self.register(f"{key}={value}")
        return self.register(f"{key}={OTHER}")

    def _room(self, key: str) -> bool:
        """Whether a counted value may still get a cell of its own (``max_admitted``)."""
        return len(self.values[key]) < self.settings.max_values + self.settings.max_admitted

    def _due(self, count: float, key_n: float) -> bool:
        sl = self.settings
        return count >= sl.admit_min and count >= sl.admit_share * key_n

    def _track(self, key: str, value: str, count: int) -> None:
        """Add to a waiting value's count; past ``max_tracked`` values, keep the larger
        half (by count, then name): memory stays bounded, and a value with real traffic
        outgrows the rare ones it is pruned with."""
        waiting = self.pending[key]
        waiting[value] = waiting.get(value, 0) + count
        cap = self.settings.max_tracked
        if len(waiting) > cap:
            keep = sorted(waiting.items(), key=lambda kv: (-kv[1], kv[0]))[: max(cap // 2, 1)]
            self.pending[key] = dict(keep)

    def assign(self, batch: PairBatch, rows: BoolArray) -> list[tuple[list[str], IntArray]]:
        """Per admitted key: (cell names, per-row index into them, -1 = no cell).

        Only values of the contributing ``rows`` are admitted, in the order of the row where
        they first appear (ties: key name), and a counted value gets its cell at the row
        where its count reaches the admission rule, so the cells, their budget weights and
        the caps depend on the data counted, never on how the stream was cut into batches."""
        if not self.enabled or not rows.any():
            return []
        per_key: list[tuple[str, list[str], IntArray, IntArray, IntArray]] = []
        for key in sorted(batch.slices):
            values, codes = batch.slices[key]
            used = np.unique(codes[rows & (codes >= 0)])
            if len(used) == 0:
                continue
            first = np.array([np.argmax(rows & (codes == u)) for u in used])
            per_key.append((key, values, codes, used, first))
        # keys and values are admitted in order of first appearance among contributing rows
        events = sorted(
            (int(f), key, int(u))
            for key, _, _, used, first in per_key
            for u, f in zip(used, first, strict=True)
        )
        names_of: dict[tuple[str, int], str] = {}
        value_names = {key: values for key, values, *_ in per_key}
        created: list[tuple[int, str, str]] = []  # (row, key, cell) in creation order
        for row, key, u in events:
            if not self._admit_key(key):
                continue
            value = value_names[key][u]
            vals = self.values[key]
            if value in vals:
                names_of[(key, u)] = f"{key}={value}"
            elif len(vals) < self.settings.max_values and value != OTHER:
                vals.append(value)
                names_of[(key, u)] = f"{key}={value}"
                created.append((row, key, f"{key}={value}"))
            else:
                names_of[(key, u)] = f"{key}={OTHER}"
                if f"{key}={OTHER}" not in self.order:
                    created.append((row, key, f"{key}={OTHER}"))
        # counted values past the cap: their cell starts at the row that admits them
        split: dict[tuple[str, int], int] = {}
        for key, values, codes, used, _ in per_key:
            if key not in self.values:
                continue
            mine = rows & (codes >= 0)
            waiting = [
                int(u)
                for u in used
                if names_of[(key, int(u))] == f"{key}={OTHER}" and values[int(u)] != OTHER
            ]
            if waiting:
                split.update(self._admissions(key, values, codes, mine, waiting, created))
            self.key_n[key] = self.key_n.get(key, 0) + int(mine.sum())
        for _, _, cell in sorted(created):
            self.register(cell)
        out: list[tuple[list[str], IntArray]] = []
        for key, values, codes, used, _ in per_key:
            if key not in self.values:
                continue
            remap = np.full(len(values), -1, dtype=np.int64)
            remap[used] = np.arange(len(used))
            names = [names_of[(key, int(u))] for u in used]
            local = np.where(codes >= 0, remap[np.maximum(codes, 0)], -1)
            for (k, u), at in split.items():
                if k != key:
                    continue
                moved = (codes == u) & (np.arange(len(codes)) >= at)
                local = np.where(moved, len(names), local)
                names.append(f"{key}={values[u]}")
            out.append((names, local))
        return out

    def _admissions(
        self,
        key: str,
        values: list[str],
        codes: IntArray,
        mine: BoolArray,
        waiting: list[int],
        created: list[tuple[int, str, str]],
    ) -> dict[tuple[str, int], int]:
        """Count the waiting values of one key in this batch; admit those whose count
        reaches the rule, at that row, in row order while ``max_admitted`` allows."""
        key_cum = self.key_n.get(key, 0) + np.cumsum(mine)  # counted rows of the key so far
        counts = self.pending.setdefault(key, {})
        due: list[tuple[int, int]] = []
        for u in waiting:
            at_rows = np.flatnonzero(mine & (codes == u))
            c = counts.get(values[u], 0) + np.arange(1, len(at_rows) + 1)
            ok = (c >= self.settings.admit_min) & (
                c >= self.settings.admit_share * key_cum[at_rows]
            )
            if ok.any():
                due.append((int(at_rows[int(np.argmax(ok))]), u))
        admitted: dict[tuple[str, int], int] = {}
        for row, u in sorted(due):
            if not self._room(key):
                break
            value = values[u]
            self.values[key].append(value)
            counts.pop(value, None)
            created.append((row, key, f"{key}={value}"))
            admitted[(key, u)] = row
        for u in waiting:
            if (key, u) in admitted:
                continue
            n_u = int((mine & (codes == u)).sum())
            if n_u:
                self._track(key, values[u], n_u)
        return admitted

    def merge(self, other: SliceCells) -> dict[str, str | None]:
        """Union of keys and values under the caps; returns the cell renames to apply.

        The other state's cells join in their own order of creation, after this state's
        (the merge of a stream's first part with its rest keeps the whole stream's order);
        a value the other state admitted by traffic keeps its cell while ``max_admitted``
        allows. Waiting counts add up, and a value whose summed count now meets the
        admission rule gets its cell (empty: rows counted before stay in ``__other__``)."""
        renames: dict[str, str | None] = {}
        for key in other.keys:
            if not self._admit_key(key):
                for v in [*other.values[key], OTHER]:
                    renames[f"{key}={v}"] = None
        for cell in other.order:
            key, _, v = cell.partition("=")
            if key not in self.values:
                continue
            vals = self.values[key]
            if v == OTHER:
                mine = self.register(f"{key}={OTHER}")
            elif v not in vals and len(vals) >= self.settings.max_values and self._room(key):
                vals.append(v)
                self.pending[key].pop(v, None)
                mine = self.register(cell)
            else:
                mine = self._cell(key, v)
            if mine != cell:
                renames[cell] = mine
        for key in other.keys:
            if key not in self.values:
                continue
            self.key_n[key] = self.key_n.get(key, 0) + other.key_n.get(key, 0)
            for v, c in sorted(other.pending.get(key, {}).items()):
                if v not in self.values[key]:
                    self._track(key, v, c)
            waiting = self.pending.get(key, {})
            for v, c in sorted(waiting.items(), key=lambda kv: (-kv[1], kv[0])):
                if self._due(c, self.key_n[key]) and self._room(key):
                    self.values[key].append(v)
                    del waiting[v]
                    self.register(f"{key}={v}")
        return renames

    def state(self) -> dict[str, Any]:
        return {
            "keys": list(self.keys),
            "values": {k: list(v) for k, v in self.values.items()},
            "order": list(self.order),
            "key_n": dict(self.key_n),
            "pending": {k: dict(v) for k, v in self.pending.items()},
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.keys = list(state.get("keys", []))
        self.values = {k: list(v) for k, v in state.get("values", {}).items()}
        for k in self.keys:
            self.values.setdefault(k, [])
        order = state.get("order")
        if order is None:  # a state from before the order was kept: values, then others
            order = [f"{k}={v}" for k in self.keys for v in self.values[k]]
        self.order = {cell: i + 1 for i, cell in enumerate(order)}
        # states from before admission by traffic: nothing counted yet
        self.key_n = {k: int(state.get("key_n", {}).get(k, 0)) for k in self.keys}
        self.pending = {
            k: {str(v): int(c) for v, c in state.get("pending", {}).get(k, {}).items()}
            for k in self.keys
        }
