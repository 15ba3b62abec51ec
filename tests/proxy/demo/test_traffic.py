"""Traffic scenarios: deterministic by seed, labels after their requests, sized to decide."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from proxy.demo import assets
from proxy.demo.sizing import expected_pairs_to_decide
from proxy.demo.traffic import (
    FAST,
    FULL,
    SLICE_HEADER,
    DemoRequest,
    LabelBatch,
    ScenarioSettings,
    Traffic,
    record_ids,
    scenario,
)

SMALL = ScenarioSettings(
    name="small",
    requests=300,
    seed=3,
    rows_per_request={1: 0.5, 3: 0.5},
    label_rate=0.7,
    label_delay_requests=10.0,
    feedback_every=5,
)


def _fingerprint(traffic: Traffic) -> list[tuple]:
    out: list[tuple] = []
    for event in traffic.events():
        if isinstance(event, DemoRequest):
            out.append(("req", event.id, event.platform, event.pool_rows, event.t))
        else:
            out.append(("lab", event.due_seq, tuple((x.id, x.label) for x in event.labels)))
    return out


def test_same_seed_same_traffic_other_seed_other_traffic(pool: assets.DemoPool) -> None:
    first = _fingerprint(Traffic(SMALL, pool))
    assert first == _fingerprint(Traffic(SMALL, pool))
    assert first != _fingerprint(Traffic(replace(SMALL, seed=4), pool))
    reseeded = Traffic(scenario("fast", seed=99), pool)
    assert reseeded.settings.requests == FAST.requests
    assert _fingerprint(reseeded)[:50] != _fingerprint(Traffic(FAST, pool))[:50]


def test_requests_carry_rows_of_their_platform_with_true_labels(pool: assets.DemoPool) -> None:
    traffic = Traffic(SMALL, pool)
    sizes = Counter()
    for req in traffic.requests():
        rows = np.array(req.pool_rows)
        assert (pool.platform[rows] == pool.platforms.index(req.platform)).all()
        np.testing.assert_array_equal(req.features, pool.features[rows])
        assert req.features.dtype == np.float32
        assert req.labels == tuple(int(v) for v in pool.labels[rows])
        assert req.headers[SLICE_HEADER] == req.platform
        assert req.headers["X-Request-Id"] == req.id
        assert req.slices == {"platform": req.platform}
        body = req.infer_body()
        assert body["id"] == req.id
        (tensor,) = body["inputs"]
        assert tensor["name"] == "features" and tensor["datatype"] == "FP32"
        assert tensor["shape"] == [len(rows), 64]
        assert len(tensor["data"]) == len(rows) * 64
        sizes[len(rows)] += 1
    assert set(sizes) == {1, 3}


def test_record_ids_follow_the_pair_record_convention() -> None:
    assert record_ids("r-1", 1) == ("r-1",)
    assert record_ids("r-1", 3) == ("r-1#0", "r-1#1", "r-1#2")


def test_labels_arrive_after_their_request_in_feedback_batches(pool: assets.DemoPool) -> None:
    traffic = Traffic(SMALL, pool)
    truth = {}
    seen: set[str] = set()
    sent_labels = []
    for event in traffic.events():
        if isinstance(event, DemoRequest):
            for rid, label in zip(event.record_ids, event.labels, strict=True):
                truth[rid] = label
                seen.add(rid)
            continue
        assert isinstance(event, LabelBatch)
        assert event.due_seq % SMALL.feedback_every == 0
        for lab in event.labels:
            assert lab.id in seen  # never before its request
            assert lab.request_seq < lab.due_seq == event.due_seq
            sent_labels.append(lab)
        assert event.feedback_body() == [{"id": x.id, "label": x.label} for x in event.labels]
    assert all(truth[lab.id] == lab.label for lab in sent_labels)
    assert len({lab.id for lab in sent_labels}) == len(sent_labels)  # each at most once
    summary = traffic.summary()
    assert summary.rows == len(truth) and summary.labels == len(sent_labels)
    # Some rows are never labelled (label rate 0.7 over ~600 rows).
    assert 0.6 < summary.labels / summary.rows < 0.8
    times = [lab.t for lab in sent_labels]
    assert times == sorted(times)


def test_platform_mix_follows_the_settings(pool: assets.DemoPool) -> None:
    summary = Traffic(FULL, pool).summary()
    share = {p: n / summary.rows for p, n in summary.rows_per_platform.items()}
    for platform, weight in FULL.platform_mix.items():
        assert abs(share[platform] - weight) < 0.03


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"requests": 0}, "requests"),
        ({"label_rate": 0.0}, "label_rate"),
        ({"label_rate": 1.5}, "label_rate"),
        ({"rows_per_request": {0: 1.0}}, "rows_per_request"),
        ({"platform_mix": {"web": -1.0}}, "platform_mix"),
        ({"platform_mix": {}}, "platform_mix"),
        ({"feedback_every": 0}, "feedback_every"),
        ({"id_prefix": "a#b"}, "id_prefix"),
    ],
)
def test_bad_settings_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ScenarioSettings(**{"name": "x", "requests": 10, **changes})


def test_unknown_platform_and_scenario_are_clear_errors(pool: assets.DemoPool) -> None:
    with pytest.raises(ValueError, match="unknown platforms"):
        Traffic(ScenarioSettings(name="x", requests=5, platform_mix={"kiosk": 1.0}), pool)
    with pytest.raises(ValueError, match="unknown scenario"):
        scenario("medium")


def test_scenario_prefix_keeps_ids_unique_across_runs(pool: assets.DemoPool) -> None:
    a = Traffic(scenario("fast", id_prefix="regressed"), pool).request(0)
    b = Traffic(scenario("fast", id_prefix="good"), pool).request(0)
    assert a.id != b.id and a.pool_rows == b.pool_rows  # same traffic, other ids


@pytest.mark.parametrize("settings", [FAST, FULL], ids=lambda s: s.name)
@pytest.mark.parametrize("candidate", [assets.CANDIDATE_REGRESSED, assets.CANDIDATE_GOOD])
def test_scenarios_carry_enough_labelled_pairs_for_every_slice_gate(
    settings: ScenarioSettings,
    candidate: str,
    pool: assets.DemoPool,
    correct: dict[str, np.ndarray],
) -> None:
    """Margin 0.02, alpha 0.05 over 4 gates and 2 sides: each slice's labels exceed the
    planning estimate with a safety factor (docs/demo.md; benchmarks/demo_sizing.py)."""
    summary = Traffic(settings, pool).summary()
    diff = correct[candidate].astype(int) - correct[assets.CHAMPION].astype(int)
    for platform in pool.platforms:
        d = diff[pool.rows_of(platform)]
        need = expected_pairs_to_decide(float(d.mean()), float((d != 0).mean()), 0.02, 0.05 / 8)
        assert summary.labels_per_platform[platform] > 2.0 * need, platform
