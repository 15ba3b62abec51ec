"""The paired record: what one mirrored request produced, shared by proxy, gates, storage.

A record is one row of a request (a request whose tensors carry a batch of B rows gives
B records, ids ``<request id>#<row>``; B == 1 keeps the request id). Its dict form is the
paired-record JSON Lines format of DESIGN.md; file I/O lives in ``storage``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Label = int | float | str | list[float] | None


@dataclass(slots=True)
class ModelResult:
    """One model's answer for one row: output vector (probabilities, embedding) or scalar.

    ``output`` is float64, or an object array of ``str`` for a BYTES output. The output
    descriptor (``name``, V2 ``datatype``, per-row ``shape`` before flattening) is what the
    contract gate compares between the two sides; None where the producer did not say
    (records written before descriptors existed).
    """

    output: np.ndarray | None = None
    latency_ms: float | None = None
    error: str | None = None
    name: str | None = None
    datatype: str | None = None
    shape: tuple[int, ...] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.output is not None

    def to_dict(self) -> dict[str, Any]:
        out: Any = None
        if self.output is not None:
            arr = np.asarray(self.output)
            out = arr.item() if arr.ndim == 0 else arr.tolist()
        data: dict[str, Any] = {"output": out, "latency_ms": self.latency_ms, "error": self.error}
        # optional keys, written only when known: older readers ignore them
        if self.name is not None:
            data["output_name"] = self.name
        if self.datatype is not None:
            data["datatype"] = self.datatype
        if self.shape is not None:
            data["shape"] = list(self.shape)
        return data

    @classmethod
    def from_dict(cls, data: Any, *, where: str) -> ModelResult:
        if data is None:
            return cls(error="missing")
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object")
        raw = data.get("output")
        output = None
        if raw is not None:
            output = _parse_output(raw, where)
        latency = data.get("latency_ms")
        if latency is not None and not isinstance(latency, int | float):
            raise ValueError(f"{where}.latency_ms: expected a number")
        error = data.get("error")
        if error is not None and not isinstance(error, str):
            raise ValueError(f"{where}.error: expected a string or null")
        name, datatype, shape = data.get("output_name"), data.get("datatype"), data.get("shape")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"{where}.output_name: expected a string")
        if datatype is not None and not isinstance(datatype, str):
            raise ValueError(f"{where}.datatype: expected a string")
        if shape is not None and (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise ValueError(f"{where}.shape: expected a list of non-negative integers")
        return cls(
            output=output,
            latency_ms=None if latency is None else float(latency),
            error=error,
            name=name,
            datatype=datatype,
            shape=None if shape is None else tuple(shape),
        )


def _parse_output(raw: Any, where: str) -> np.ndarray:
    """Numbers become float64; a string or a flat list of strings (BYTES) an object array."""
    if isinstance(raw, str) or (
        isinstance(raw, list) and raw and all(isinstance(v, str) for v in raw)
    ):
        return np.array(raw if isinstance(raw, list) else [raw], dtype=object)
    try:
        output = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}.output: not a number, a string or a flat list of them") from exc
    if output.ndim > 1:
        raise ValueError(f"{where}.output: expected a number or a flat list")
    return output


@dataclass(slots=True)
class PairRecord:
    id: str
    ts: float
    champion: ModelResult
    candidate: ModelResult
    slices: dict[str, str] = field(default_factory=dict)
    features: dict[str, float | str] = field(default_factory=dict)
    label: Label = None
    inputs_digest: str = ""
    stage: str = "shadow"
    served_by: Literal["champion", "candidate"] = "champion"
    # Captured input tensors (name -> array of this row); never part of the JSONL form.
    inputs: dict[str, np.ndarray] | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "ts": self.ts,
            "slices": dict(self.slices),
            "features": dict(self.features),
            "champion": self.champion.to_dict(),
            "candidate": self.candidate.to_dict(),
            "label": self.label,
        }
        if self.inputs_digest:
            data["inputs_digest"] = self.inputs_digest
        if self.stage != "shadow":
            data["stage"] = self.stage
        if self.served_by != "champion":
            data["served_by"] = self.served_by
        return data

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "record") -> PairRecord:
        """Parse one JSONL object; raises ValueError naming the field on bad input."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object")
        rid = data.get("id")
        if not isinstance(rid, str | int) or isinstance(rid, bool) or rid == "":
            raise ValueError(f"{where}.id: expected a non-empty string")
        ts = data.get("ts")
        if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
            raise ValueError(f"{where}.ts: expected a finite number")
        slices = data.get("slices") or {}
        if not isinstance(slices, dict):
            raise ValueError(f"{where}.slices: expected an object")
        features = data.get("features") or {}
        if not isinstance(features, dict):
            raise ValueError(f"{where}.features: expected an object")
        for k, v in features.items():
            if not isinstance(v, int | float | str) or isinstance(v, bool):
                raise ValueError(f"{where}.features.{k}: expected a number or a string")
        served_by = data.get("served_by", "champion")
        if served_by not in ("champion", "candidate"):
            raise ValueError(f"{where}.served_by: expected 'champion' or 'candidate'")
        return cls(
            id=str(rid),
            ts=float(ts),
            slices={str(k): str(v) for k, v in slices.items()},
            features=dict(features),
            champion=ModelResult.from_dict(data.get("champion"), where=f"{where}.champion"),
            candidate=ModelResult.from_dict(data.get("candidate"), where=f"{where}.candidate"),
            label=data.get("label"),
            inputs_digest=str(data.get("inputs_digest") or ""),
            stage=str(data.get("stage") or "shadow"),
            served_by=served_by,
        )
