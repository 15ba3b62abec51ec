"""Paired records as columns: what ``mirrorgate replay`` reads a recorded file into.

Replay's fast path never builds a :class:`PairRecord` per line only to turn the records
back into arrays (``PairBatch.from_records``): a reader fills these columns straight from
the parsed lines and :meth:`PairBatch.from_columns <gates.batch.PairBatch.from_columns>`
builds the gates' batch from them. The shape is deliberately narrow, the shape almost
every recorded line has: both sides answered (no error), every output of a side has the
same length (or every output is a number) and the same descriptor. Anything else stays a
record; :meth:`records` gives the records these rows stand for, for the label join and
for a look that mixes both forms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gates.records import ModelResult, PairRecord

FloatArray = NDArray[np.float64]
# (output_name, datatype, per-row shape) of one side, the same on every row; None: unsaid
Descriptor = tuple[str | None, str | None, tuple[int, ...] | None]


@dataclass
class PairColumns:
    """``n`` rows. ``champion``/``candidate`` are ``(n, k)`` matrices, or ``(n,)`` when
    every output is a number; latencies are NaN where the record has none."""

    ids: list[str]
    ts: FloatArray
    champion: FloatArray
    candidate: FloatArray
    champion_latency: FloatArray
    candidate_latency: FloatArray
    slices: list[dict[str, str]]
    features: list[dict[str, Any]]
    labels: list[Any]
    champion_desc: Descriptor = (None, None, None)
    candidate_desc: Descriptor = (None, None, None)

    @property
    def n(self) -> int:
        return len(self.ids)

    def signature(self) -> tuple[Any, ...]:
        """Columns with equal signatures concatenate into columns of the same shape."""
        return (
            self.champion.shape[1:],
            self.candidate.shape[1:],
            self.champion_desc,
            self.candidate_desc,
        )

    def rows(self, start: int, stop: int) -> PairColumns:
        return PairColumns(
            ids=self.ids[start:stop],
            ts=self.ts[start:stop],
            champion=self.champion[start:stop],
            candidate=self.candidate[start:stop],
            champion_latency=self.champion_latency[start:stop],
            candidate_latency=self.candidate_latency[start:stop],
            slices=self.slices[start:stop],
            features=self.features[start:stop],
            labels=self.labels[start:stop],
            champion_desc=self.champion_desc,
            candidate_desc=self.candidate_desc,
        )

    @staticmethod
    def concat(parts: Sequence[PairColumns]) -> PairColumns:
        """One block of several with the same :meth:`signature`."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        if any(p.signature() != first.signature() for p in parts):
            raise ValueError("columns of different shapes or descriptors")

        def cat(name: str) -> Any:
            return np.concatenate([getattr(p, name) for p in parts])

        return PairColumns(
            ids=[x for p in parts for x in p.ids],
            ts=cat("ts"),
            champion=cat("champion"),
            candidate=cat("candidate"),
            champion_latency=cat("champion_latency"),
            candidate_latency=cat("candidate_latency"),
            slices=[x for p in parts for x in p.slices],
            features=[x for p in parts for x in p.features],
            labels=[x for p in parts for x in p.labels],
            champion_desc=first.champion_desc,
            candidate_desc=first.candidate_desc,
        )

    def side(self, role: str, i: int) -> ModelResult:
        """Row ``i`` of one side as the record parser would have built it."""
        matrix = self.champion if role == "champion" else self.candidate
        latency = self.champion_latency if role == "champion" else self.candidate_latency
        name, datatype, shape = self.champion_desc if role == "champion" else self.candidate_desc
        lat = float(latency[i])
        return ModelResult(
            output=np.asarray(matrix[i]),  # a number is a 0-d array, as from_dict makes it
            latency_ms=None if lat != lat else lat,  # NaN: the record had none
            error=None,
            name=name,
            datatype=datatype,
            shape=shape,
        )

    def records(self) -> list[PairRecord]:
        """The records these rows stand for (the gates read the same values from either)."""
        return [
            PairRecord(
                id=self.ids[i],
                ts=float(self.ts[i]),
                champion=self.side("champion", i),
                candidate=self.side("candidate", i),
                slices=self.slices[i],
                features=self.features[i],
                label=self.labels[i],
            )
            for i in range(self.n)
        ]
