"""The traffic as a paired-record JSONL file: records PairRecord accepts, real outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gates.records import PairRecord
from proxy.demo import assets
from proxy.demo.capture import FEATURE_NAMES
from proxy.demo.offline import OfflineModel
from proxy.demo.recorded import (
    DEFAULT_START_TS,
    iter_pair_records,
    paired_correctness,
    write_pairs_jsonl,
)
from proxy.demo.traffic import ScenarioSettings, Traffic

SMALL = ScenarioSettings(
    name="small",
    requests=80,
    seed=5,
    rows_per_request={1: 0.5, 4: 0.5},
    label_rate=0.75,
    label_delay_requests=8.0,
)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_inline_labels_file_round_trips_through_pair_record(
    tmp_path: Path, pool: assets.DemoPool, models: dict[str, OfflineModel]
) -> None:
    traffic = Traffic(SMALL, pool)
    out = tmp_path / "pairs.jsonl"
    written = write_pairs_jsonl(
        out, traffic, models[assets.CHAMPION], models[assets.CANDIDATE_REGRESSED]
    )
    lines = _read(out)
    records = [PairRecord.from_dict(obj, where=f"line {i + 1}") for i, obj in enumerate(lines)]
    assert written.pairs == len(records) == traffic.summary().rows
    assert written.labels == sum(r.label is not None for r in records)
    expected_ids = [rid for req in traffic.requests() for rid in req.record_ids]
    assert [r.id for r in records] == expected_ids
    truth = {lab.id: lab.label for lab in traffic.labels()}
    by_id = {r.id: r for r in records}
    for req in traffic.requests():
        champ = models[assets.CHAMPION].predict_proba(req.features)
        cand = models[assets.CANDIDATE_REGRESSED].predict_proba(req.features)
        for k, rid in enumerate(req.record_ids):
            rec = by_id[rid]
            assert rec.slices == {"platform": req.platform}
            assert rec.ts == pytest.approx(DEFAULT_START_TS + req.t)
            np.testing.assert_allclose(rec.champion.output, champ[k], rtol=1e-6)
            np.testing.assert_allclose(rec.candidate.output, cand[k], rtol=1e-6)
            assert rec.champion.ok and rec.candidate.ok
            assert rec.champion.latency_ms is not None and rec.champion.latency_ms >= 0
            assert rec.label == truth.get(rid)
            assert list(rec.features) == list(FEATURE_NAMES)
            np.testing.assert_array_equal(
                np.array(list(rec.features.values()), dtype=np.float32), req.features[k]
            )


def test_separate_labels_file_carries_arrival_times(
    tmp_path: Path, pool: assets.DemoPool, models: dict[str, OfflineModel]
) -> None:
    traffic = Traffic(SMALL, pool)
    pairs, labels = tmp_path / "pairs.jsonl", tmp_path / "labels.jsonl"
    written = write_pairs_jsonl(
        pairs,
        traffic,
        assets.model_path(assets.CHAMPION),
        assets.model_path(assets.CANDIDATE_GOOD),
        labels_path=labels,
        include_features=False,
    )
    records = [PairRecord.from_dict(obj) for obj in _read(pairs)]
    assert all(r.label is None and r.features == {} for r in records)
    label_lines = _read(labels)
    assert written.labels == len(label_lines) > 0
    ts_of = {r.id: r.ts for r in records}
    for line in label_lines:
        assert set(line) == {"id", "label", "ts"}
        assert line["ts"] > ts_of[line["id"]]  # a label arrives after its pair
    assert [x["ts"] for x in label_lines] == sorted(x["ts"] for x in label_lines)


def test_file_outcomes_match_the_offline_story(
    tmp_path: Path, pool: assets.DemoPool, models: dict[str, OfflineModel]
) -> None:
    """What a replay would see: per-slice paired correctness equals the pool's truth."""
    traffic = Traffic(SMALL, pool)
    records = list(
        iter_pair_records(traffic, models[assets.CHAMPION], models[assets.CANDIDATE_REGRESSED])
    )
    labels = {lab.id: lab.label for lab in traffic.labels()}
    champ, cand, slices = paired_correctness(records, labels)
    assert len(champ) == len(labels)
    rows = {
        rid: row
        for req in traffic.requests()
        for rid, row in zip(req.record_ids, req.pool_rows, strict=True)
    }
    labelled = np.array([rows[r.id] for r in records if r.id in labels])
    truth = pool.labels[labelled]
    for got, name in ((champ, assets.CHAMPION), (cand, assets.CANDIDATE_REGRESSED)):
        np.testing.assert_array_equal(got, models[name].predict(pool.features[labelled]) == truth)
    assert set(slices) <= set(pool.platforms)


class _FailingModel(OfflineModel):
    """The real model, made to fail on its n-th call: a fault injected to check that a
    failed write leaves nothing behind (a real runtime failure cannot be provoked on cue)."""

    def __init__(self, path: Path, fail_on: int) -> None:
        super().__init__(path)
        self.calls = 0
        self.fail_on = fail_on

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("injected failure")
        return super().predict_proba(features)


def test_a_failed_write_leaves_no_file(tmp_path: Path, pool: assets.DemoPool) -> None:
    traffic = Traffic(SMALL, pool)
    out, labels = tmp_path / "pairs.jsonl", tmp_path / "labels.jsonl"
    failing = _FailingModel(assets.model_path(assets.CANDIDATE_GOOD), fail_on=40)
    with pytest.raises(RuntimeError, match="injected"):
        write_pairs_jsonl(
            out, traffic, assets.model_path(assets.CHAMPION), failing, labels_path=labels
        )
    assert list(tmp_path.iterdir()) == []


def test_write_script_rejects_a_missing_folder(tmp_path: Path) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[3] / "scripts" / "write_demo_pairs.py"
    spec = importlib.util.spec_from_file_location("write_demo_pairs", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = tmp_path / "nope" / "pairs.jsonl"
    assert module.main(["--candidate", "good", "--out", str(missing)]) == 2
    same = tmp_path / "pairs.jsonl"
    assert module.main(["--candidate", "good", "--out", str(same), "--labels", str(same)]) == 2
    assert list(tmp_path.iterdir()) == []
