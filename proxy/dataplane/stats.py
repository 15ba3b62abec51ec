"""Triton's statistics extension for in-process models (docs/proxy.md).

``GET /v2/models[/{m}[/versions/{v}]]/stats`` answers Triton's JSON shape, so tools
written against Triton (``tritonclient``'s ``get_inference_statistics``, perf tooling)
read mirrorgate's numbers:

* ``success`` / ``fail``: requests answered with outputs / with an error, end to end.
* ``queue``: reading the request body before any work starts (mirrorgate has no
  scheduler queue; a micro-batching wait is inside ``compute_infer``).
* ``compute_input``: decoding and validating the request.
* ``compute_infer``: the model call (including a micro-batch wait).
* ``compute_output``: encoding the response.
* ``inference_count``: rows inferred (the batch axis), ``execution_count``: model calls,
  ``last_inference``: milliseconds since the epoch of the last success.

Durations are nanoseconds of ``time.perf_counter_ns``; counts are only ever added to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

_PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


@dataclass(slots=True)
class _Version:
    durations: dict[str, list[int]] = field(default_factory=lambda: {p: [0, 0] for p in _PHASES})
    inference_count: int = 0
    execution_count: int = 0
    last_inference: int = 0

    def add(self, phase: str, ns: int) -> None:
        slot = self.durations[phase]
        slot[0] += 1
        slot[1] += max(0, ns)


class ModelStats:
    """Per-version counters of one served model."""

    def __init__(self, name: str, versions: tuple[str, ...]) -> None:
        self.name = name
        self._versions = {v: _Version() for v in versions}

    def versions(self) -> tuple[str, ...]:
        return tuple(self._versions)

    def success(
        self,
        version: str,
        *,
        rows: int,
        queue_ns: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
    ) -> None:
        v = self._versions.setdefault(version, _Version())
        v.add("queue", queue_ns)
        v.add("compute_input", input_ns)
        v.add("compute_infer", infer_ns)
        v.add("compute_output", output_ns)
        v.add("success", queue_ns + input_ns + infer_ns + output_ns)
        v.inference_count += max(1, rows)
        v.execution_count += 1
        v.last_inference = time.time_ns() // 1_000_000

    def failure(self, version: str, ns: int) -> None:
        self._versions.setdefault(version, _Version()).add("fail", ns)

    def to_dict(self, version: str | None = None) -> dict[str, Any]:
        chosen = [version] if version is not None else list(self._versions)
        stats = []
        for name in chosen:
            v = self._versions[name]
            inference = {p: {"count": c, "ns": ns} for p, (c, ns) in v.durations.items()}
            inference["cache_hit"] = {"count": 0, "ns": 0}
            inference["cache_miss"] = {"count": 0, "ns": 0}
            stats.append(
                {
                    "name": self.name,
                    "version": name,
                    "last_inference": v.last_inference,
                    "inference_count": v.inference_count,
                    "execution_count": v.execution_count,
                    "inference_stats": inference,
                    "batch_stats": [],
                }
            )
        return {"model_stats": stats}
