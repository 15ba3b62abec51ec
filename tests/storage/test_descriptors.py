"""Output descriptors (name, datatype, per-row shape) survive the database (issue 12).

SQLite and real PostgreSQL (the COPY path): the recorder, export -> import -> export
byte-identical in JSON Lines and Parquet, string (BYTES) outputs, rows written under
migration 0002, and a contract violation that only the descriptors show (same shape,
another datatype family) recorded live through the real mirror and still found by
``mirrorgate replay`` of the exported file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from alembic import command
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from gates.records import ModelResult, PairRecord
from proxy.cli.main import main
from storage.db import Database
from storage.files import read_pairs, write_pairs
from storage.migrate import alembic_config, head_revision, upgrade
from storage.recorder import SqlRecorder
from storage.settings import StorageSettings
from storage.store import Store
from tests.proxy.dataplane.test_output_kinds import OPSET, mirrored_pairs
from tests.storage.factories import CANDIDATE, CHAMPION


def described_records() -> list[PairRecord]:
    return [
        PairRecord(  # class probabilities, a class fewer on the candidate
            id="d-1",
            ts=1764050000.25,
            champion=ModelResult(np.array([0.1, 0.2, 0.7]), 1.5, None, "probs", "FP32", (3,)),
            candidate=ModelResult(np.array([0.4, 0.6]), 2.5, None, "probs", "FP32", (2,)),
            label=2,
            inputs_digest="a1",
        ),
        PairRecord(  # class index: a scalar per row, shape ()
            id="d-2",
            ts=1764050001.0,
            champion=ModelResult(np.float64(3.0), 1.0, None, "label", "INT64", ()),
            candidate=ModelResult(np.float64(3.0), 1.0, None, "label", "INT32", ()),
            inputs_digest="a2",
        ),
        PairRecord(  # strings (BYTES), several per row
            id="d-3",
            ts=1764050002.0,
            champion=ModelResult(
                np.array(["cat", "ünï ✓"], dtype=object), 0.5, None, "y", "BYTES", (1, 2)
            ),
            candidate=ModelResult(
                np.array(["CAT", "ÜNÏ ✓"], dtype=object), 0.75, None, "y", "BYTES", (1, 2)
            ),
            label="cat",
            inputs_digest="a3",
        ),
        PairRecord(  # a failed candidate: no descriptor on that side
            id="d-4",
            ts=1764050003.0,
            champion=ModelResult(np.array([0.5, 0.5]), 1.0, None, "probs", "FP64", (2,)),
            candidate=ModelResult(None, None, "candidate timed out after 2000 ms"),
            inputs_digest="a4",
        ),
        PairRecord(  # a record from before descriptors
            id="d-5",
            ts=1764050004.0,
            champion=ModelResult(np.array([0.5, 0.5]), 1.0, None),
            candidate=ModelResult(np.array([0.25, 0.75]), 1.0, None),
            inputs_digest="a5",
        ),
    ]


def test_store_round_trip_keeps_descriptors_and_strings(store):
    store.create_rollout(CHAMPION, CANDIDATE, rollout_id="r-d")
    originals = described_records()
    store.write_pairs("r-d", originals)
    back = list(store.iter_pairs("r-d"))
    assert [r.to_dict() for r in back] == [r.to_dict() for r in originals]
    assert back[0].candidate.shape == (2,) and back[1].champion.shape == ()
    assert back[2].champion.output is not None and back[2].champion.output.dtype == object
    assert back[4].champion.name is None and back[4].champion.shape is None


async def test_the_recorder_keeps_descriptors(db, db_url, store, rollout):
    """The live path: SqlRecorder's bulk insert (COPY on PostgreSQL)."""
    rec = SqlRecorder(db, rollout.id, _settings(db_url), registry=CollectorRegistry())
    await rec.start()
    originals = described_records()
    assert all(rec.submit(r) for r in originals)
    assert await rec.flush(timeout_s=60)
    back = list(store.iter_pairs(rollout.id))
    assert [r.to_dict() for r in back] == [r.to_dict() for r in originals]
    await rec.aclose()


def _settings(url: str) -> StorageSettings:
    return StorageSettings.model_validate(
        {"url": url, "batch_size": 10, "flush_interval_ms": 20, "close_timeout_s": 30}
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_export_import_export_is_byte_identical_with_descriptors(
    db_url, empty_url, tmp_path, capsys, suffix
):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    source = Database(db_url)
    Store(source).create_rollout(CHAMPION, CANDIDATE, rollout_id="r-src")
    originals = described_records()
    Store(source).write_pairs("r-src", originals)
    source.dispose()
    first = tmp_path / f"first{suffix}"
    assert (
        main(["export", "pairs", "--url", db_url, "--rollout", "r-src", "--out", str(first)]) == 0
    )
    assert [r.to_dict() for r in read_pairs(first)] == [r.to_dict() for r in originals]
    if suffix == ".jsonl":
        line = json.loads(first.read_text().splitlines()[0])
        assert line["candidate"]["output_name"] == "probs"
        assert line["candidate"]["datatype"] == "FP32" and line["candidate"]["shape"] == [2]
    capsys.readouterr()
    assert main(["import", "pairs", str(first), "--url", empty_url]) == 0
    new_rollout = capsys.readouterr().out.strip()
    second = tmp_path / f"second{suffix}"
    assert (
        main(
            ["export", "pairs", "--url", empty_url, "--rollout", new_rollout, "--out", str(second)]
        )
        == 0
    )
    if suffix == ".jsonl":
        assert second.read_bytes() == first.read_bytes()
    else:  # Parquet metadata may differ run to run: the records must not
        assert [r.to_dict() for r in read_pairs(second)] == [r.to_dict() for r in originals]


def test_parquet_written_before_descriptors_still_reads(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "new.parquet"
    write_pairs(path, described_records())
    table = pq.read_table(path)
    old_columns = [
        c
        for c in table.column_names
        if not c.endswith(("_strings", "_output_name", "_datatype", "_shape"))
    ]
    old = tmp_path / "old.parquet"
    pq.write_table(table.select(old_columns), old)
    back = list(read_pairs(old))
    assert [r.id for r in back] == [f"d-{i}" for i in range(1, 6)]
    assert all(r.champion.name is None and r.champion.shape is None for r in back)
    assert pa is not None


def test_upgrade_from_0002_keeps_existing_rows(empty_url):
    """Rows written under 0002 read back without descriptors; new rows keep theirs."""
    db = Database(empty_url)
    try:
        with db.engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0002_replicas_exact")
        from storage.codec import encode_output

        blob = encode_output(np.array([0.25, 0.75]))
        with db.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO rollouts (id, champion_name, champion_kind, champion_digest, "
                    "champion_device, config_digest, task, created_at, status, stage) VALUES "
                    "('r-old', 'c', 'onnx', 'sha256:a', 'cpu', '', '', 1.0, 'active', 'shadow')"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO pairs (rollout_id, request_id, ts, inputs_digest, "
                    "champion_output, candidate_output, stage, served_by) VALUES "
                    "('r-old', 'old-1', 2.0, 'x', :b, :b, 'shadow', 'champion')"
                ),
                {"b": blob},
            )
        assert upgrade(db).current == head_revision()
        store = Store(db)
        (old,) = store.get_pairs("old-1")
        assert old.champion.name is None and old.candidate.shape is None
        np.testing.assert_array_equal(old.champion.output, [0.25, 0.75])
        store.write_pairs("r-old", described_records()[:1])
        (new,) = store.get_pairs("d-1")
        assert (new.candidate.name, new.candidate.datatype, new.candidate.shape) == (
            "probs",
            "FP32",
            (2,),
        )
        with db.engine.begin() as conn:  # and back down: the descriptors go, rows stay
            command.downgrade(alembic_config(conn), "0002_replicas_exact")
            assert conn.execute(text("SELECT count(*) FROM pairs")).scalar_one() == 2
    finally:
        db.dispose()


def test_pinned_failures_keep_descriptors(store, rollout):
    """A harvested case reads back with its evidence's output descriptors (migration
    0004), as a pair does; a side without them (a failed call) stays without."""
    from proxy.control.pinned import case_to_dict
    from storage.entities import HarvestedCase

    for record in described_records()[:4]:
        store.harvest(
            HarvestedCase(task="t", rule="r", record=record, rollout_id=rollout.id), now=5.0
        )
    cases = {c.evidence.id: c for c in store.list_pinned(task="t")}
    for record in described_records()[:4]:
        back = store.get_pinned(cases[record.id].id).evidence
        for side in ("champion", "candidate"):
            got, sent = getattr(back, side), getattr(record, side)
            assert (got.name, got.datatype, got.shape) == (sent.name, sent.datatype, sent.shape)
    view = case_to_dict(cases["d-1"])["evidence"]
    assert view["candidate"]["output_name"] == "probs" and view["candidate"]["shape"] == [2]
    assert view["champion"]["datatype"] == "FP32"
    assert "output_name" not in case_to_dict(cases["d-4"])["evidence"]["candidate"]


def test_upgrade_from_0003_keeps_pinned_rows(empty_url):
    """A pinned case harvested under 0003 reads back without descriptors after the
    upgrade; the downgrade drops the columns and keeps the row."""
    db = Database(empty_url)
    try:
        with db.engine.begin() as conn:
            command.upgrade(alembic_config(conn), "0003_output_descriptors")
            conn.execute(
                text(
                    "INSERT INTO pinned_failures (task, inputs_digest, status, rule, "
                    "request_id, seen_at, first_seen, last_seen, recurrence_count, "
                    "updated_at) VALUES ('t', 'old', 'candidate', 'r', 'old-1', 1.0, 1.0, "
                    "1.0, 1, 1.0)"
                )
            )
        assert upgrade(db).current == head_revision()
        (old,) = Store(db).list_pinned(task="t")
        assert old.evidence.champion.name is None and old.evidence.candidate.shape is None
        with db.engine.begin() as conn:
            command.downgrade(alembic_config(conn), "0003_output_descriptors")
            count = conn.execute(text("SELECT count(*) FROM pinned_failures")).scalar_one()
            assert count == 1
    finally:
        db.dispose()


# ------------------------------------------------- live -> database -> export -> replay


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def build_score(path: Path, weight: np.ndarray, *, integer: bool) -> None:
    """``x`` [batch, n] -> ``y`` [batch, 1]: a float score, or the same rounded to INT64.

    Same name and per-row shape on both: only the datatype tells them apart."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["s" if integer else "y"])]
    if integer:
        nodes.append(helper.make_node("Cast", ["s"], ["y"], to=TensorProto.INT64))
    graph = helper.make_graph(
        nodes,
        "score",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weight.shape[0]])],
        [
            helper.make_tensor_value_info(
                "y", TensorProto.INT64 if integer else TensorProto.FLOAT, ["batch", 1]
            )
        ],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "W")],
    )
    _save(graph, path)


async def test_a_live_contract_violation_is_found_by_replay_of_the_export(
    db, db_url, store, rollout, tmp_path, capsys
):
    weight = np.random.default_rng(5).normal(size=(4, 1)) * 3.0
    build_score(tmp_path / "champ.onnx", weight, integer=False)
    build_score(tmp_path / "cand.onnx", weight, integer=True)
    x = np.random.default_rng(6).normal(size=(60, 4)).astype(np.float32)
    rec = SqlRecorder(db, rollout.id, _settings(db_url), registry=CollectorRegistry())
    await rec.start()
    live = await mirrored_pairs(tmp_path / "champ.onnx", tmp_path / "cand.onnx", x, sinks=[rec])
    assert await rec.flush(timeout_s=60)
    await rec.aclose()
    assert (live[0].champion.datatype, live[0].candidate.datatype) == ("FP32", "INT64")
    assert live[0].champion.shape == live[0].candidate.shape == (1,)

    out = tmp_path / "pairs.jsonl"
    assert (
        main(["export", "pairs", "--url", db_url, "--rollout", rollout.id, "--out", str(out)]) == 0
    )
    capsys.readouterr()
    assert main(["replay", "--pairs", str(out), "--json"]) == 1  # abort
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "abort", report
    contract = next(g for g in report["gates"] if g["name"] == "contract")
    assert contract["status"] == "FAIL"
    assert "datatype INT64 instead of FP32" in contract["reason"]

    # Without the descriptors (what the export held before issue 12's storage part) the
    # same file looks comparable: the contract gate cannot see the violation.
    stripped = tmp_path / "stripped.jsonl"
    records = list(read_pairs(out))
    for r in records:
        for side in (r.champion, r.candidate):
            side.name = side.datatype = side.shape = None
    write_pairs(stripped, records)
    main(["replay", "--pairs", str(stripped), "--json"])
    blind = json.loads(capsys.readouterr().out)
    contract = next(g for g in blind["gates"] if g["name"] == "contract")
    assert contract["status"] != "FAIL"
