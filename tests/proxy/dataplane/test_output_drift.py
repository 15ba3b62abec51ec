"""Output drift per kind on real model outputs (ONNX models built here, the real mirror).

For vector regression, embeddings and strings: a pool of paired outputs comes from the
real mirror once per model pair; seeded streams are random orders of that pool, fed to
``drift.output`` in chunks with a look after each (continuous monitoring). A candidate
whose output distribution moved beyond the limit must fail on (nearly) every stream; one
that moved well inside it must (nearly) never fail, at any look. The distance of each
pool is computed independently with scipy / numpy (the oracle), so the scenario is known
to be inside or beyond the limit before the gate is asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import ks_2samp

from gates.drift import OutputDriftGate
from gates.records import PairRecord
from gates.result import Status
from gates.settings import GatesSettings
from tests.proxy.dataplane.test_output_kinds import (
    N_FEATURES,
    build_onnx_linear,
    build_onnx_strings,
    mirrored_pairs,
)

STREAMS = 20
CHUNK = 100
LIMIT = 0.1


def settings(**over: Any) -> GatesSettings:
    return GatesSettings.model_validate(
        {
            "preset": "equivalence",
            "drift": {"output": {"reference_size": 200, "ks": LIMIT, **over}},
        }
    )


def fail_rate(records: list[PairRecord], gates: GatesSettings, task: str) -> float:
    """Share of seeded streams on which drift.output FAILs at some look."""
    fails = 0
    for seed in range(STREAMS):
        order = np.random.default_rng(seed).permutation(len(records))
        stream = [records[i] for i in order]
        gate = OutputDriftGate(gates, alpha=0.01, task=task)  # type: ignore[arg-type]
        for start in range(0, len(stream), CHUNK):
            gate.update(stream[start : start + CHUNK])
            if gate.result.status is Status.FAIL:
                fails += 1
                break
    return fails / STREAMS


def outputs(records: list[PairRecord], side: str) -> np.ndarray:
    return np.array([np.asarray(getattr(r, side).output, dtype=np.float64) for r in records])


def _x(rows: int, seed: int, bias: bool = False) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(rows, N_FEATURES)).astype(np.float32)
    if bias:
        x[:, 0] = 1.0  # a constant input: the embeddings share a mean direction
    return x


def test_presets_make_output_drift_evidence_or_blocking() -> None:
    assert not GatesSettings().drift.output.blocking  # retrained: evidence
    assert GatesSettings.model_validate({"preset": "equivalence"}).drift.output.blocking


# ------------------------------------------------------------------- vector regression


async def test_vector_regression_drift_per_element(tmp_path: Path) -> None:
    rng = np.random.default_rng(41)
    weight = rng.normal(size=(N_FEATURES, 6))
    near, far = weight.copy(), weight.copy()
    near[:, 2] *= 1.04  # element 2 a little wider: inside the limit
    far[:, 4] *= 2.5  # element 4 much wider: beyond it (its norm moves too)
    for name, w in (("champ", weight), ("near", near), ("far", far)):
        build_onnx_linear(tmp_path / f"{name}.onnx", w)
    x = _x(1500, seed=42)
    gates = settings()
    by_name = {}
    for name in ("near", "far"):
        records = await mirrored_pairs(
            tmp_path / "champ.onnx", tmp_path / f"{name}.onnx", x, output={"task": "regression"}
        )
        ch, ca = outputs(records, "champion"), outputs(records, "candidate")
        columns = [(ch[:, j], ca[:, j]) for j in range(6)]
        columns.append((np.linalg.norm(ch, axis=1), np.linalg.norm(ca, axis=1)))
        by_name[name] = (records, max(ks_2samp(a, b).statistic for a, b in columns))
    records, distance = by_name["near"]
    assert distance < 0.6 * LIMIT  # oracle: every element's CDF moved well inside
    assert fail_rate(records, gates, "regression") <= 0.05
    records, distance = by_name["far"]
    assert distance > 2 * LIMIT
    assert fail_rate(records, gates, "regression") >= 0.95
    # the failing coordinate names the element (or the norm), not element 0
    gate = OutputDriftGate(gates, alpha=0.01, task="regression")
    gate.update(records)
    result = gate.results[0]
    assert result.status is Status.FAIL and result.blocking
    assert gate.kind == "vector_regression"
    assert "element 4" in result.details["coordinate"] or "norm" in result.details["coordinate"]
    # the same stream under the default (retrained) preset: evidence, never blocking
    evidence = OutputDriftGate(
        GatesSettings.model_validate({"drift": {"output": {"reference_size": 200}}}),
        alpha=0.01,
        task="regression",
    )
    evidence.update(records)
    cell = evidence.results[0]
    assert cell.status is Status.FAIL and not cell.blocking


# --------------------------------------------------------------------------- embeddings


def _rotation(dim: int, angle: float) -> np.ndarray:
    q = np.eye(dim)
    c, s = np.cos(angle), np.sin(angle)
    q[:2, :2] = [[c, -s], [s, c]]
    return q


async def test_embedding_drift_norm_and_direction(tmp_path: Path) -> None:
    rng = np.random.default_rng(51)
    weight = rng.normal(size=(N_FEATURES, 8))
    full, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    build_onnx_linear(tmp_path / "champ.onnx", weight, output="emb")
    build_onnx_linear(tmp_path / "near.onnx", weight @ _rotation(8, 0.02), output="emb")
    build_onnx_linear(tmp_path / "far.onnx", weight @ full, output="emb")
    x = _x(1500, seed=52, bias=True)
    gates = settings()
    gates = gates.model_copy(update={"kinds": {"emb": "embedding"}})
    for name, inside in (("near", True), ("far", False)):
        records = await mirrored_pairs(tmp_path / "champ.onnx", tmp_path / f"{name}.onnx", x)
        ch, ca = outputs(records, "champion"), outputs(records, "candidate")
        center = (ch / np.linalg.norm(ch, axis=1, keepdims=True)).mean(axis=0)

        def cos(rows: np.ndarray, c: np.ndarray = center) -> np.ndarray:
            return rows @ c / np.linalg.norm(rows, axis=1) / np.linalg.norm(c)

        distance = max(
            ks_2samp(np.linalg.norm(ch, axis=1), np.linalg.norm(ca, axis=1)).statistic,
            ks_2samp(cos(ch), cos(ca)).statistic,
        )
        rate = fail_rate(records, gates, "classification")
        if inside:
            assert distance < 0.6 * LIMIT
            assert rate <= 0.05
        else:
            assert distance > 2 * LIMIT
            assert rate >= 0.95
    gate = OutputDriftGate(gates, alpha=0.01, task="classification")
    gate.update(records)
    assert gate.kind == "embedding"
    assert gate.results[0].details["coordinate"].startswith("P(cosine to the champion")


# ------------------------------------------------------------------------------ strings


async def test_string_drift_over_top_values_with_other(tmp_path: Path) -> None:
    build_onnx_strings(tmp_path / "champ.onnx", upper=False)
    build_onnx_strings(tmp_path / "cand.onnx", upper=True)
    gates = settings()
    # upper-casing moves the lower-case words' share to a value the champion never says
    # (counted in __other__): 4% of traffic inside the limit, 35% beyond it
    for words, p, inside in (
        (["DOG", "EMU", "cat"], [0.5, 0.46, 0.04], True),
        (["DOG", "EMU", "cat"], [0.4, 0.25, 0.35], False),
    ):
        rng = np.random.default_rng(61)
        texts = [words[k] for k in rng.choice(3, size=1200, p=p)]
        x = np.array([[t.encode()] for t in texts], dtype=object)
        records = await mirrored_pairs(tmp_path / "champ.onnx", tmp_path / "cand.onnx", x, rows=1)
        share = np.mean([t != t.upper() for t in texts])  # oracle: the moved share
        rate = fail_rate(records, gates, "auto")
        if inside:
            assert share < 0.6 * LIMIT
            assert rate <= 0.05
        else:
            assert share > 2 * LIMIT
            assert rate >= 0.95
    gate = OutputDriftGate(gates, alpha=0.01)
    gate.update(records)
    assert gate.kind == "string"
    assert gate.results[0].details["coordinate"] in ("P(output = 'cat')", "P(output = '__other__')")


@pytest.mark.parametrize("kind", ["vector_regression", "string"])
def test_state_round_trip_and_merge_per_kind(kind: str) -> None:
    """Two replicas' states merged equal the whole stream; the state survives JSON."""
    from gates.records import ModelResult

    rng = np.random.default_rng(71)
    records = []
    for i in range(600):
        if kind == "string":
            a = np.array([str(rng.integers(0, 5))], dtype=object)
            b = np.array([str(rng.integers(0, 6))], dtype=object)
            ch = ModelResult(a, 1.0, None, "y", "BYTES", (1,))
            ca = ModelResult(b, 1.0, None, "y", "BYTES", (1,))
        else:
            v = rng.normal(size=3)
            ch = ModelResult(v, 1.0, None, "y", "FP32", (3,))
            ca = ModelResult(v * 1.5, 1.0, None, "y", "FP32", (3,))
        records.append(PairRecord(id=str(i), ts=float(i), champion=ch, candidate=ca))
    gates = settings()
    task: Any = "regression" if kind != "string" else "auto"
    whole = OutputDriftGate(gates, alpha=0.01, task=task)
    whole.update(records)
    first = OutputDriftGate(gates, alpha=0.01, task=task)
    first.update(records[:200])  # the reference: fixes the bins, nothing counted yet
    assert first.channels is not None and first.n == 0
    # a replica starting from the calibrated state (as gate snapshots are shared)
    second = OutputDriftGate.from_state(first.state_dict(), gates, alpha=0.01)
    first.update(records[200:400])
    second.update(records[400:])
    first.merge(OutputDriftGate.from_state(second.state_dict(), gates, alpha=0.01))
    assert first.kind == whole.kind == kind
    for k in ("champion", "candidate", "both"):
        np.testing.assert_array_equal(first.counts[k], whole.counts[k])
    assert first.result.statistic == whole.result.statistic
