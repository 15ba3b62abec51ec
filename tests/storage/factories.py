"""Test data: paired records with every field set, and polling for a condition."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np

from gates.records import ModelResult, PairRecord
from storage.entities import ModelInfo

CHAMPION = ModelInfo(name="champion", kind="onnx", digest="sha256:aaa", device="cpu")
CANDIDATE = ModelInfo(name="candidate", kind="torch", digest="sha256:bbb", device="cpu")


def make_record(
    i: int,
    *,
    ts: float | None = None,
    agree: bool = True,
    label: object = None,
    inputs: bool = True,
    rid: str | None = None,
) -> PairRecord:
    rng = np.random.default_rng(i)
    p = float(rng.uniform(0.55, 0.95))
    champ = np.array([1 - p, p])
    cand = champ if agree else champ[::-1].copy()
    return PairRecord(
        id=rid or f"req-{i}",
        ts=1_764_050_000.125 + i if ts is None else ts,
        champion=ModelResult(output=champ, latency_ms=3.25 + i, error=None),
        candidate=ModelResult(output=cand, latency_ms=4.5, error=None),
        slices={"platform": "mobile" if i % 2 else "web"},
        features={"age": 20 + i, "income": 52_000.5, "country": "NL"},
        label=label,  # type: ignore[arg-type]
        inputs_digest="",
        stage="shadow",
        served_by="champion",
        inputs={"x": rng.normal(size=(1, 8)).astype(np.float32)} if inputs else None,
    )


async def eventually(
    predicate: Callable[[], bool], *, timeout_s: float = 60.0, what: str = "condition"
) -> None:
    """Poll until true. The timeout only bounds a broken run; nothing asserts on time."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)
