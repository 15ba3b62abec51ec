"""`mirrorgate export pairs` / `mirrorgate import pairs|labels` (SQLite + PostgreSQL)."""

from __future__ import annotations

import json

import numpy as np

from gates.records import ModelResult, PairRecord
from proxy.cli.main import main
from storage.db import Database
from storage.files import read_pairs
from storage.store import Store


def every_kind_of_record() -> list[PairRecord]:
    return [
        PairRecord(
            id="r-1",
            ts=1764050000.125,
            slices={"platform": "mobile", "country": "NL"},
            features={"age": 31, "income": 52000.0, "segment": "gold"},
            champion=ModelResult(np.array([0.1, 0.9]), 3.2, None),
            candidate=ModelResult(np.array([0.2, 0.8]), 4.1, None),
            label=1,
            inputs_digest="d1",
        ),
        PairRecord(
            id="r-2#0",
            ts=1764050001.5,
            slices={},
            features={},
            champion=ModelResult(np.array([0.7, 0.3]), 2.0, None),
            candidate=ModelResult(None, None, "candidate timed out after 2000 ms"),
            label=None,
            inputs_digest="d2",
            stage="canary-25",
            served_by="candidate",
        ),
        PairRecord(  # regression: scalar outputs, float label
            id="r-3",
            ts=1764050002.0,
            slices={"platform": "web"},
            features={"x": -1.5e-9},
            champion=ModelResult(np.float64(12.25), 1.0, None),
            candidate=ModelResult(np.float64(13.0), 1.5, None),
            label=12.5,
            inputs_digest="d3",
        ),
        PairRecord(  # embedding output, vector label; champion failed
            id="r-4",
            ts=1764050003.0,
            slices={"tenant": "ünïcode ✓"},
            features={},
            champion=ModelResult(None, 0.5, "champion: HTTP 503"),
            candidate=ModelResult(np.array([0.5, -0.25, 1e-300]), 9.75, None),
            label=[0.0, 1.0, 2.5],
            inputs_digest="d4",
        ),
        PairRecord(
            id="r-5",
            ts=1764050004.0,
            champion=ModelResult(np.array([0.5, 0.5]), None, None),
            candidate=ModelResult(np.array([0.5, 0.5]), None, None),
            label="cat",
            inputs_digest="d5",
        ),
    ]


def test_export_import_round_trips_every_field(db_url, empty_url, tmp_path, capsys):
    source = Database(db_url)
    store = Store(source)
    from tests.storage.factories import CANDIDATE, CHAMPION

    store.create_rollout(CHAMPION, CANDIDATE, rollout_id="r-src")
    originals = every_kind_of_record()
    store.write_pairs("r-src", originals)
    source.dispose()

    first = tmp_path / "first.jsonl"
    assert (
        main(["export", "pairs", "--url", db_url, "--rollout", "r-src", "--out", str(first)]) == 0
    )
    assert [r.to_dict() for r in read_pairs(first)] == [r.to_dict() for r in originals]
    # The file is the DESIGN.md format: plain JSON objects, one per line.
    line = json.loads(first.read_text().splitlines()[0])
    assert line["champion"] == {"output": [0.1, 0.9], "latency_ms": 3.2, "error": None}

    # Into another (empty, unmigrated) database: import creates the schema and a rollout.
    capsys.readouterr()
    assert main(["import", "pairs", str(first), "--url", empty_url]) == 0
    new_rollout = capsys.readouterr().out.strip()
    second = tmp_path / "second.jsonl"
    assert (
        main(
            ["export", "pairs", "--url", empty_url, "--rollout", new_rollout, "--out", str(second)]
        )
        == 0
    )
    assert second.read_bytes() == first.read_bytes()

    # --rollout appends to an existing rollout.
    assert main(["import", "pairs", str(first), "--url", empty_url, "--rollout", new_rollout]) == 0
    target = Database(empty_url)
    assert Store(target).count_pairs(new_rollout) == 2 * len(originals)
    target.dispose()


def test_bad_import_writes_nothing(db_url, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    good = [json.dumps(r.to_dict()) for r in every_kind_of_record()[:2]]
    path.write_text("\n".join([*good, '{"id": "x", "ts": "yesterday"}']) + "\n")
    assert main(["import", "pairs", str(path), "--url", db_url, "--rollout", "r-new"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:3" in err and "ts" in err
    db = Database(db_url)
    store = Store(db)
    assert store.count_pairs() == 0 and store.list_rollouts() == []
    db.dispose()


def test_export_errors_are_exit_2(db_url, tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    assert main(["export", "pairs", "--url", db_url, "--rollout", "nope", "--out", str(out)]) == 2
    assert "no rollout 'nope'" in capsys.readouterr().err
    assert not out.exists()
    db = Database(db_url)
    from tests.storage.factories import CHAMPION

    Store(db).create_rollout(CHAMPION, rollout_id="r-x")
    db.dispose()
    bad_dir = tmp_path / "missing" / "x.jsonl"
    assert (
        main(["export", "pairs", "--url", db_url, "--rollout", "r-x", "--out", str(bad_dir)]) == 2
    )
    assert "cannot write" in capsys.readouterr().err


def test_import_labels_joins_them(db_url, tmp_path, capsys):
    db = Database(db_url)
    store = Store(db)
    from tests.storage.factories import CHAMPION

    store.create_rollout(CHAMPION, rollout_id="r-l")
    store.write_pairs("r-l", every_kind_of_record()[:2])
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"id": "r-2#0", "label": 0, "ts": 5}\n{"id": "unknown", "label": 1}\n')
    assert main(["import", "labels", str(labels), "--url", db_url]) == 0
    assert "2 labels; 1 pairs labelled" in capsys.readouterr().err
    assert store.get_pairs("r-2#0")[0].label == 0
    assert [e.request_id for e in store.pending_labels()] == ["unknown"]
    db.dispose()
