"""Columns (replay's fast path) give the gates exactly what records give them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gates.batch import PairBatch
from gates.columns import PairColumns
from gates.join import LabelJoin
from gates.records import ModelResult, PairRecord
from gates.replay import OutOfOrder, replay, replay_stream
from gates.settings import GatesSettings
from gates.simulate import Scenario, records
from tests.gates.conftest import plan

STAGE = {"min_pairs": 600, "min_labels": 300, "min_duration_s": 0.0, "max_duration_s": None}
PLAN = plan({"name": "shadow", **STAGE}, {"name": "canary", **STAGE}, every=250, every_s=7.0)
GATES = GatesSettings.model_validate(
    {
        "metric": {"min_samples": 100},
        "slices": {"min_samples": 150},
        "tolerance": {"min_samples": 100, "flip": {"max_rate": 0.25}},
        "latency": {"min_samples": 100},
        "errors": {"min_samples": 100},
    }
)


def to_columns(recs: list[PairRecord]) -> PairColumns:
    """What the file reader builds from these records' lines (all in the column shape)."""

    def desc(m: ModelResult) -> tuple[str | None, str | None, tuple[int, ...] | None]:
        return (m.name, m.datatype, m.shape)

    def lat(m: ModelResult) -> float:
        return np.nan if m.latency_ms is None else m.latency_ms

    return PairColumns(
        ids=[r.id for r in recs],
        ts=np.array([r.ts for r in recs]),
        champion=np.array([r.champion.output for r in recs], dtype=np.float64),
        candidate=np.array([r.candidate.output for r in recs], dtype=np.float64),
        champion_latency=np.array([lat(r.champion) for r in recs]),
        candidate_latency=np.array([lat(r.candidate) for r in recs]),
        slices=[dict(r.slices) for r in recs],
        features=[dict(r.features) for r in recs],
        labels=[r.label for r in recs],
        champion_desc=desc(recs[0].champion),
        candidate_desc=desc(recs[0].candidate),
    )


def with_desc(recs, ch, ca):
    return [
        dataclasses.replace(
            r,
            champion=dataclasses.replace(r.champion, name=ch[0], datatype=ch[1], shape=ch[2]),
            candidate=dataclasses.replace(r.candidate, name=ca[0], datatype=ca[1], shape=ca[2]),
        )
        for r in recs
    ]


FIELDS = [
    "n", "ts", "champion", "candidate", "comparable", "contract_fault", "champion_error",
    "candidate_error", "champion_timeout", "candidate_timeout", "observed",
    "champion_latency", "candidate_latency", "output_name", "datatype", "contract_example",
]  # fmt: skip


def assert_same_batch(a: PairBatch, b: PairBatch) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            assert x == y, name
    assert a.slices.keys() == b.slices.keys()
    for key, (values, codes) in a.slices.items():
        assert values == b.slices[key][0]
        np.testing.assert_array_equal(codes, b.slices[key][1])
    assert list(a.raw_labels()) == list(b.raw_labels())
    assert a.feature_names() == b.feature_names()
    for name in a.feature_names():
        assert a.feature_values(name, a.n) == b.feature_values(name, b.n)
        na, ca = a.feature(name)
        nb, cb = b.feature(name)
        np.testing.assert_array_equal(na, nb)
        assert (ca is None) == (cb is None)
        if ca is not None:
            assert ca.tolist() == cb.tolist()


@pytest.mark.parametrize(
    "ch, ca",
    [
        ((None, None, None), (None, None, None)),
        (("probs", "FP32", (3,)), ("probs", "FP32", (3,))),
        (("probs", "FP32", (3,)), ("scores", "FP32", (3,))),  # a contract fault on every row
    ],
)
def test_from_columns_is_from_records(ch, ca):
    recs = with_desc(records(Scenario.aa(), 700, seed=3), ch, ca)
    recs = [
        dataclasses.replace(
            r,
            label=None if i % 3 else r.label,
            features={} if i % 7 == 0 else r.features,
            slices={**r.slices, **({"region": "eu"} if i % 5 == 0 else {})},
        )
        for i, r in enumerate(recs)
    ]
    cols = to_columns(recs)
    assert_same_batch(PairBatch.from_columns(cols), PairBatch.from_records(recs))
    # and the records the columns give back build the same batch too
    assert_same_batch(PairBatch.from_columns(cols), PairBatch.from_records(cols.records()))
    rows = np.array([1, 4, 9, 600], dtype=np.int64)
    assert_same_batch(
        PairBatch.from_columns(cols).select(rows),
        PairBatch.from_records(recs).select(rows),
    )
    if ch != ca:
        assert PairBatch.from_columns(cols).contract_fault.all()


def same(a, b) -> None:
    da, db = a.to_dict(), b.to_dict()
    for key in ("verdict", "decided_at", "reason", "stage"):
        assert da[key] == db[key], key
    assert [(g["name"], g["slice"], g["status"], g["statistic"], g["n"]) for g in da["gates"]] == [
        (g["name"], g["slice"], g["status"], g["statistic"], g["n"]) for g in db["gates"]
    ]
    assert da["decisions"] == db["decisions"]


def fast(r: PairRecord) -> bool:
    return r.champion.ok and r.candidate.ok


def blocks(recs: list[PairRecord], rng: np.random.Generator) -> list:
    """Uneven blocks; rows with an error (not the column shape) stay records."""
    out: list = []
    i = 0
    while i < len(recs):
        part = recs[i : i + int(rng.integers(1, 900))]
        i += len(part)
        run: list[PairRecord] = []
        for r in part:
            if run and fast(run[-1]) != fast(r):
                out.append(to_columns(run) if fast(run[-1]) else run)
                run = []
            run.append(r)
        if run:
            out.append(to_columns(run) if fast(run[-1]) else run)
    return out


@pytest.mark.parametrize("scenario", ["abort", "promote"])
def test_stream_decides_as_the_whole_file_replay(scenario):
    sc = (
        Scenario.slice_regression(drop=0.3, gain=0.02, candidate_error_rate=0.01)
        if scenario == "abort"
        else Scenario.slice_regression(
            drop=-0.05, gain=0.05, candidate_error_rate=0.01, champion_error_rate=0.01
        )
    )
    recs = records(sc, 10000, seed=41)
    rng = np.random.default_rng(5)
    # a third unlabelled with a timed label a little later, a tenth labelled "immediately"
    labels: list = []
    plain: list[PairRecord] = []
    for i, r in enumerate(recs):
        if i % 3 == 0:
            labels.append((r.id, r.label, r.ts + float(rng.uniform(0, 20))))
            r = dataclasses.replace(r, label=None)
        elif i % 10 == 1:
            labels.append((r.id, r.label, None))
            r = dataclasses.replace(r, label=None)
        # an integer feature on every row: a typed column on the column side
        plain.append(dataclasses.replace(r, features={**r.features, "visits": i % 17}))
    labels.append(("nobody", 1, plain[10].ts))

    def run(stream: bool, **kw):
        args = {"gates": GATES, "plan": PLAN, "join": LabelJoin(label_window_s=60.0)}
        if stream:
            return replay_stream(blocks(plain, np.random.default_rng(9)), labels, **args, **kw)
        return replay(plain, labels, **args)

    whole = run(False)
    assert whole.evaluation.verdict == scenario
    streamed = run(True)
    same(whole, streamed)
    assert streamed.pairs_read < whole.pairs_read and not streamed.read_to_end
    full = run(True, read_all=True)
    same(whole, full)
    assert full.to_dict()["replay"] == whole.to_dict()["replay"]


def test_stream_refuses_pairs_that_go_back_in_time():
    recs = records(Scenario.aa(), 300, seed=2)
    recs[200], recs[100] = recs[100], recs[200]
    with pytest.raises(OutOfOrder):
        replay_stream([recs[:150], recs[150:]], gates=GATES, plan=PLAN, read_all=True)
