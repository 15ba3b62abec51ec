"""Output contract and output kinds end to end: real ONNX / Torch models built here, the
real mirror building records (with their output descriptors), the real rollout engine.

Each model pair differs in one known way; each test asserts the gate that must see it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import CollectorRegistry

from gates.engine import RolloutEngine
from gates.harvest import rule_masks
from gates.records import PairRecord
from gates.result import Status
from gates.settings import GatesSettings, RolloutSettings
from proxy.backends.factory import create_backend
from proxy.core.config import MirrorgateConfig
from proxy.core.metrics import ProxyMetrics
from proxy.dataplane.mirror import MirrorDispatcher
from storage.sink import MemorySink, PairSink
from tests.proxy.models import (
    OPSET,
    build_onnx_classifier,
    build_torchscript_classifier,
)

N_FEATURES = 4
ROWS_PER_REQUEST = 10


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def build_onnx_linear(path: Path, weight: np.ndarray, output: str = "y") -> None:
    """``x`` FP32 [batch, n] -> ``output`` = x @ weight, FP32 [batch, d]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], [output])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weight.shape[0]])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", weight.shape[1]])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "W")],
    )
    _save(graph, path)


def _backend(name: str, path: Path) -> dict[str, Any]:
    kind = "torch" if path.suffix == ".pt" else "onnx"
    return {"name": name, "kind": kind, "path": str(path), "timeout_ms": 30_000}


async def mirrored_pairs(
    champion: Path,
    candidate: Path,
    x: np.ndarray,
    rows: int = ROWS_PER_REQUEST,
    sinks: Sequence[PairSink] = (),
    **sections: Any,
) -> list[PairRecord]:
    """Every row of ``x`` through the real mirror (shadow mode): the records it writes."""
    config = MirrorgateConfig.model_validate(
        {
            "server": {"model_name": "m"},
            "models": {
                "champion": _backend("champion", champion),
                "candidate": _backend("candidate", candidate),
            },
            "mirror": {"timeout_ms": 30_000, "queue_size": 100_000},
            **sections,
        }
    )
    assert config.models.candidate is not None
    sink = MemorySink()
    mirror = MirrorDispatcher(
        champion=await create_backend(config.models.champion),
        candidate=await create_backend(config.models.candidate),
        config=config,
        sinks=[sink, *sinks],
        metrics=ProxyMetrics(CollectorRegistry()),
        rng=random.Random(0),
    )
    try:
        for i in range(0, len(x), rows):
            await mirror.infer({"x": x[i : i + rows]}, request_id=f"r{i:06d}")
        assert await mirror.drain(120.0) == 0
    finally:
        await mirror.champion.aclose()
        assert mirror.candidate is not None
        await mirror.candidate.aclose()
    records = sorted(sink.records, key=lambda r: r.id)
    assert len(records) == len(x)
    return records


def engine(gates: dict[str, Any] | None = None, *, task: Any = "auto") -> RolloutEngine:
    return RolloutEngine(
        GatesSettings.model_validate(gates or {}),
        RolloutSettings.model_validate(
            {"stages": [{"name": "shadow", "min_pairs": 1, "min_labels": 0, "min_duration_s": 0}]}
        ),
        task=task,
        start_ts=0.0,
    )


def results(eng: RolloutEngine) -> dict[str, Any]:
    return {r.label: r for r in eng.results()}


def _x(rows: int, seed: int = 0, n: int = N_FEATURES) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, n)).astype(np.float32)


# ------------------------------------------------------------------------- contract


async def test_candidate_with_one_class_fewer_aborts_on_contract_within_50_pairs(
    tmp_path: Path,
) -> None:
    build_onnx_classifier(tmp_path / "champ.onnx", N_FEATURES, n_classes=4, seed=1)
    build_onnx_classifier(tmp_path / "cand.onnx", N_FEATURES, n_classes=3, seed=2)
    records = await mirrored_pairs(
        tmp_path / "champ.onnx",
        tmp_path / "cand.onnx",
        _x(50),
        output={"task": "classification", "output": "probs"},
    )
    # the records carry both sides' descriptors: same name and datatype, 4 vs 3 classes
    r = records[0]
    assert (r.champion.name, r.champion.datatype, r.champion.shape) == ("probs", "FP32", (4,))
    assert (r.candidate.name, r.candidate.datatype, r.candidate.shape) == ("probs", "FP32", (3,))
    eng = engine(task="classification")
    verdict = None
    for k, rec in enumerate(records, start=1):
        eng.observe([rec])
        verdict = eng.evaluate(now=float(k))
        if verdict.verdict == "abort":
            break
    assert verdict is not None and verdict.verdict == "abort", verdict.reason
    assert k <= 50
    contract = results(eng)["contract"]
    assert contract.status is Status.FAIL and contract.blocking
    assert verdict.reason.startswith(f"abort at stage shadow after {k} pairs")
    assert "contract FAIL" in verdict.reason
    # reported with both shapes
    assert contract.details["champion"] == "probs FP32 [4] per row"
    assert contract.details["candidate"] == "probs FP32 [3] per row"
    assert "class count: candidate [3] vs champion [4]" in contract.reason
    # ... and counted as candidate errors, never silently skipped: one per request (its
    # rows share the call; docs/gates.md), each request seen so far failed
    # (sums: n, sum d, sum d^2, champion failures, candidate failures)
    requests = len({rec.id.split("#")[0] for rec in records[:k]})
    assert eng.gates["errors"].sums["error"][0] == requests  # type: ignore[attr-defined]
    assert eng.gates["errors"].sums["error"][4] == requests  # type: ignore[attr-defined]
    assert eng.gates["errors"].sums["error"][3] == 0  # type: ignore[attr-defined]


async def test_identical_interfaces_never_break_the_contract(tmp_path: Path) -> None:
    build_onnx_classifier(tmp_path / "champ.onnx", N_FEATURES, n_classes=3, seed=1)
    build_onnx_classifier(tmp_path / "cand.onnx", N_FEATURES, n_classes=3, seed=2)
    records = await mirrored_pairs(tmp_path / "champ.onnx", tmp_path / "cand.onnx", _x(600))
    eng = engine(task="classification")
    eng.observe(records)
    contract = results(eng)["contract"]
    assert contract.n == 600 and contract.details["violations"] == 0
    assert contract.status is Status.PASS


# ------------------------------------------------------------------------- class index


async def test_class_index_outputs_with_labels_give_the_right_accuracy_on_every_class(
    tmp_path: Path,
) -> None:
    w_c = build_onnx_classifier(tmp_path / "champ.onnx", N_FEATURES, n_classes=3, seed=1)
    w_a = build_onnx_classifier(tmp_path / "cand.onnx", N_FEATURES, n_classes=3, seed=2)
    x = _x(900, seed=5)
    records = await mirrored_pairs(
        tmp_path / "champ.onnx",
        tmp_path / "cand.onnx",
        x,
        output={"task": "classification", "output": "label"},
    )
    assert records[0].champion.datatype == "INT64" and records[0].champion.shape == ()
    # ground truth from a third model: every class is present
    truth = classifier_truth(x)
    assert set(truth.tolist()) == {0, 1, 2}
    for rec, y in zip(records, truth, strict=True):
        rec.label = int(y)
    eng = engine(task="classification")
    eng.observe(records)
    eng.observe_labelled(records)
    assert eng.gates["metric"].kind == "class_index"  # type: ignore[attr-defined]
    assert eng.gates["tolerance"].kind == "class_index"  # type: ignore[attr-defined]
    res = results(eng)
    pred_c, pred_a = w_c.labels(x), w_a.labels(x)
    acc = res["metric.accuracy"]
    assert acc.n == 900  # every labelled pair used, not only those labelled 0 or 1
    assert acc.details["champion"] == pytest.approx(np.mean(pred_c == truth))
    assert acc.details["candidate"] == pytest.approx(np.mean(pred_a == truth))
    for k in range(3):
        cell = res[f"metric.recall[class={k}]"]
        rows = truth == k
        assert cell.n == rows.sum()
        assert cell.details["champion"] == pytest.approx(np.mean(pred_c[rows] == k))
        assert cell.details["candidate"] == pytest.approx(np.mean(pred_a[rows] == k))
    flip = res["tolerance.flip"]
    assert flip.statistic == pytest.approx(np.mean(pred_c != pred_a))
    # no score-based checks for a class index
    assert "tolerance.shift" not in res and "metric.high_confidence_error" not in res
    # output drift reads the class ids as classes (one-hot), not as P(class 1)
    eng.evaluate(now=1.0)
    drift = eng.gates["drift.output"]
    np.testing.assert_array_equal(
        drift.counts["champion"][:3],  # type: ignore[attr-defined]
        np.bincount(pred_c, minlength=3),
    )
    # harvesting reads the class ids too: a pair is a wrong-label case when either is wrong
    wrong = rule_masks(records, GatesSettings().harvest, task="classification")["wrong_label"]
    np.testing.assert_array_equal(wrong, (pred_c != truth) | (pred_a != truth))


def classifier_truth(x: np.ndarray) -> np.ndarray:
    from tests.proxy.models import classifier_weights

    return classifier_weights(N_FEATURES, 3, seed=3).labels(x)


# ------------------------------------------------------------------- vector regression


async def test_vector_regression_candidate_off_in_one_element_fails(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    weight = rng.normal(size=(N_FEATURES, 16))
    off = weight.copy()
    off[:, 9] *= 100.0  # element 9 only: elements 0..8 and 10..15 are identical
    build_onnx_linear(tmp_path / "champ.onnx", weight)
    build_onnx_linear(tmp_path / "cand.onnx", off)
    build_onnx_linear(tmp_path / "same.onnx", weight)
    x = _x(400, seed=8)
    bad = await mirrored_pairs(
        tmp_path / "champ.onnx", tmp_path / "cand.onnx", x, output={"task": "regression"}
    )
    eng = engine({"preset": "equivalence"}, task="regression")
    eng.observe(bad)
    res = results(eng)
    assert eng.gates["tolerance"].kind == "vector_regression"  # type: ignore[attr-defined]
    assert res["tolerance.regression"].status is Status.FAIL
    assert res["tolerance.norm"].status is Status.FAIL
    assert eng.evaluate(now=1.0).verdict == "abort"
    # the same model on both sides passes: the check can pass, not only fail
    same = await mirrored_pairs(
        tmp_path / "champ.onnx", tmp_path / "same.onnx", x, output={"task": "regression"}
    )
    ok = engine({"preset": "equivalence"}, task="regression")
    ok.observe(same)
    res = results(ok)
    assert res["tolerance.regression"].status is Status.PASS
    assert res["tolerance.norm"].status is Status.PASS


# --------------------------------------------------------------------------- embeddings


async def test_embedding_candidate_with_rotated_vectors_fails(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    weight = rng.normal(size=(N_FEATURES, 8))
    # a rotation of the embedding space: norms kept, directions moved
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    build_onnx_linear(tmp_path / "champ.onnx", weight, output="emb")
    build_onnx_linear(tmp_path / "cand.onnx", weight @ q, output="emb")
    x = _x(400, seed=12)
    records = await mirrored_pairs(tmp_path / "champ.onnx", tmp_path / "cand.onnx", x)
    # the kind comes from the per-output override, not from the (classification) task
    eng = engine({"preset": "equivalence", "kinds": {"emb": "embedding"}}, task="classification")
    eng.observe(records)
    res = results(eng)
    assert eng.gates["tolerance"].kind == "embedding"  # type: ignore[attr-defined]
    cos = res["tolerance.cosine"]
    assert cos.status is Status.FAIL
    a = x.astype(np.float64) @ weight
    b = a @ q
    dist = 1 - (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.statistic == pytest.approx(np.mean(dist > 0.05), abs=1e-9)
    assert eng.evaluate(now=1.0).verdict == "abort"


def test_unknown_kind_is_a_start_up_error_naming_the_output() -> None:
    with pytest.raises(ValueError, match=r"gates\.kinds\.scores: unknown output kind 'logit'"):
        MirrorgateConfig.model_validate(
            {
                "models": {"champion": {"name": "c", "kind": "http", "url": "http://x"}},
                "gates": {"kinds": {"scores": "logit"}},
            }
        )


# ----------------------------------------------------------------- equivalence preset


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_equivalence_re_export_onnx_vs_torch_passes_tolerance(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    build_onnx_classifier(tmp_path / "champ.onnx", N_FEATURES, n_classes=3, seed=4)
    build_torchscript_classifier(tmp_path / "cand.pt", N_FEATURES, n_classes=3, seed=4)
    records = await mirrored_pairs(
        tmp_path / "champ.onnx",
        tmp_path / "cand.pt",
        _x(600, seed=13),
        output={"task": "classification", "output": "probs"},
    )
    eng = engine({"preset": "equivalence"}, task="classification")
    assert eng.settings.tolerance.blocking
    eng.observe(records)
    res = results(eng)
    for check in ("tolerance.shift", "tolerance.flip", "tolerance.collapse"):
        assert res[check].status is Status.PASS, res[check].reason
        assert res[check].blocking
    assert res["contract"].status is Status.PASS


# ------------------------------------------------------------------------------ strings


def build_onnx_strings(path: Path, upper: bool) -> None:
    """``x`` BYTES [1, n] -> ``y``: unchanged, or upper-cased (StringNormalizer)."""
    node = (
        helper.make_node("StringNormalizer", ["x"], ["y"], case_change_action="UPPER", locale="C")
        if upper
        else helper.make_node("Identity", ["x"], ["y"])
    )
    graph = helper.make_graph(
        [node],
        "strings",
        [helper.make_tensor_value_info("x", TensorProto.STRING, [1, "n"])],
        [helper.make_tensor_value_info("y", TensorProto.STRING, [1, "n"])],
    )
    _save(graph, path)


async def test_string_outputs_are_compared_by_exact_match(tmp_path: Path) -> None:
    build_onnx_strings(tmp_path / "champ.onnx", upper=False)
    build_onnx_strings(tmp_path / "cand.onnx", upper=True)
    rng = np.random.default_rng(3)
    words = ["cat", "DOG", "Cow", "EMU"]  # upper-casing changes 2 of the 4
    texts = [words[int(k)] for k in rng.integers(0, 4, size=300)]
    x = np.array([[t.encode()] for t in texts], dtype=object)
    # the models take one row [1, n] per request
    records = await mirrored_pairs(tmp_path / "champ.onnx", tmp_path / "cand.onnx", x, rows=1)
    assert records[0].champion.datatype == "BYTES"
    assert records[0].champion.output is not None and records[0].champion.output.dtype == object
    for rec, t in zip(records, texts, strict=True):
        rec.label = t  # the champion is always right, the candidate only on upper-case words
    eng = engine({"preset": "equivalence"})
    eng.observe(records)
    eng.observe_labelled(records)
    res = results(eng)
    assert eng.gates["tolerance"].kind == "string"  # type: ignore[attr-defined]
    changed = np.mean([t != t.upper() for t in texts])
    mismatch = res["tolerance.mismatch"]
    assert mismatch.statistic == pytest.approx(changed) and mismatch.status is Status.FAIL
    acc = res["metric.accuracy"]
    assert acc.n == 300
    assert acc.details["champion"] == 1.0
    assert acc.details["candidate"] == pytest.approx(1.0 - changed)
    assert res["contract"].details["violations"] == 0


# ------------------------------------------------------------------ logits, multi-label


def build_onnx_scores(path: Path, weight: np.ndarray, final: str | None) -> None:
    """``x`` -> ``y`` = final(x @ weight): raw logits (None), Softmax or Sigmoid."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z" if final else "y"])]
    if final == "Softmax":
        nodes.append(helper.make_node("Softmax", ["z"], ["y"], axis=1))
    elif final == "Sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["z"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "scores",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "W")],
    )
    _save(graph, path)


async def test_logits_are_compared_after_a_softmax(tmp_path: Path) -> None:
    rng = np.random.default_rng(21)
    w_c, w_a = rng.normal(size=(N_FEATURES, 4)), rng.normal(size=(N_FEATURES, 4))
    for name, w in (("lc", w_c), ("la", w_a)):
        build_onnx_scores(tmp_path / f"{name}.onnx", w, None)
    for name, w in (("pc", w_c), ("pa", w_a)):
        build_onnx_scores(tmp_path / f"{name}.onnx", w, "Softmax")
    x = _x(300, seed=22)
    logits = await mirrored_pairs(tmp_path / "lc.onnx", tmp_path / "la.onnx", x)
    probs = await mirrored_pairs(tmp_path / "pc.onnx", tmp_path / "pa.onnx", x)
    by_kind = {}
    for kind, recs in (("logits", logits), ("probabilities", probs)):
        eng = engine({"preset": "equivalence"}, task="classification")
        eng.observe(recs)
        assert eng.gates["tolerance"].kind == kind  # type: ignore[attr-defined]
        by_kind[kind] = results(eng)
    # the same models, one exporting logits: the same comparison after the softmax
    for check in ("tolerance.shift", "tolerance.flip", "tolerance.collapse"):
        assert by_kind["logits"][check].statistic == pytest.approx(
            by_kind["probabilities"][check].statistic
        )
    assert by_kind["logits"]["tolerance.flip"].statistic > 0.1  # the candidates differ


async def test_multilabel_outputs_compare_every_label_decision(tmp_path: Path) -> None:
    rng = np.random.default_rng(31)
    weight = rng.normal(size=(N_FEATURES, 5))
    flipped = weight.copy()
    flipped[:, 3] *= -1.0  # label 3's decision reverses; labels 0-2 and 4 are identical
    build_onnx_scores(tmp_path / "champ.onnx", weight, "Sigmoid")
    build_onnx_scores(tmp_path / "cand.onnx", flipped, "Sigmoid")
    x = _x(400, seed=32)
    records = await mirrored_pairs(tmp_path / "champ.onnx", tmp_path / "cand.onnx", x)
    truth = (x.astype(np.float64) @ weight >= 0).astype(int)  # the champion is right
    for rec, y in zip(records, truth, strict=True):
        rec.label = y.tolist()
    eng = engine({"preset": "equivalence"}, task="classification")
    eng.observe(records)
    eng.observe_labelled(records)
    res = results(eng)
    assert eng.gates["tolerance"].kind == "multilabel"  # type: ignore[attr-defined]
    z3 = x.astype(np.float64) @ weight[:, 3]
    assert res["tolerance.flip"].statistic == pytest.approx(np.mean(z3 != 0))
    assert res["tolerance.flip"].status is Status.FAIL
    acc = res["metric.accuracy"]
    assert acc.n == 400 and acc.details["champion"] == 1.0
    assert acc.details["candidate"] == pytest.approx(np.mean(z3 == 0))
