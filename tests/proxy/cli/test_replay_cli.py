"""``mirrorgate replay``: JSON shape, exit codes 0 / 1 / 2, messages naming the line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gates.simulate import Scenario, records
from proxy.cli.main import main

ROOT = Path(__file__).resolve().parents[3]
FAST = """
gates:
  tolerance: {flip: {max_rate: 0.25}, shift: {max_rate: 0.25}}
  metric: {min_samples: 100}
  slices: {min_samples: 150}
rollout:
  evaluate_every_pairs: 200
  stages:
    - {name: shadow, min_pairs: 300, min_labels: 200, min_duration_s: 0}
"""


def write(path: Path, recs) -> Path:
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in recs))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("replay")
    bad = records(Scenario.slice_regression(drop=0.3, gain=0.02), 5000, seed=31)
    good = records(Scenario.slice_regression(drop=-0.05, gain=0.05), 8000, seed=32)
    (d / "fast.yaml").write_text(FAST)
    return {
        "bad": write(d / "bad.jsonl", bad),
        "good": write(d / "good.jsonl", good),
        "config": d / "fast.yaml",
        "dir": d,
    }


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["replay", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_abort_exits_1_with_the_design_json(capsys, files):
    code, out, _ = run(
        capsys, "--pairs", str(files["bad"]), "--config", str(files["config"]), "--json"
    )
    assert code == 1
    doc = json.loads(out)
    assert doc["verdict"] == "abort"
    assert set(doc["decided_at"]) == {"pairs", "labels"} and doc["decided_at"]["pairs"] > 0
    assert "platform=android" in doc["reason"] and "FAIL" in doc["reason"]
    assert doc["gates"]
    for g in doc["gates"]:
        assert {"name", "slice", "status", "statistic", "threshold", "n", "method"} <= set(g)
    assert any(g["status"] == "FAIL" and g["slice"] == "platform=android" for g in doc["gates"])


def test_promote_exits_0_and_prints_the_evidence(capsys, files):
    code, out, _ = run(capsys, "--pairs", str(files["good"]), "--config", str(files["config"]))
    assert code == 0
    assert out.startswith("verdict: promote")
    assert "decided at: pair" in out and "metric.accuracy" in out and "evidence:" in out


def test_continue_without_config_exits_0(capsys, files):
    # the default plan needs minutes of traffic per stage: a short file is undecided
    code, out, _ = run(capsys, "--pairs", str(files["good"]), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["verdict"] == "continue" and doc["decided_at"] is None
    assert any(g["slice"].startswith("platform=") for g in doc["gates"])  # keys found


def test_separate_label_file(capsys, files):
    d = files["dir"]
    recs = records(Scenario.slice_regression(drop=0.3, gain=0.02), 5000, seed=33)
    labels = "".join(
        json.dumps({"id": r.id, "label": r.label, "ts": r.ts + 2.0}) + "\n" for r in recs
    )
    for r in recs:
        r.label = None
    pairs = write(d / "bare.jsonl", recs)
    (d / "labels.jsonl").write_text(labels)
    code, out, _ = run(
        capsys,
        "--pairs",
        str(pairs),
        "--labels",
        str(d / "labels.jsonl"),
        "--config",
        str(files["config"]),
        "--json",
    )
    assert code == 1
    doc = json.loads(out)
    assert 0 < doc["decided_at"]["labels"] <= doc["decided_at"]["pairs"]


def test_bad_input_exits_2_naming_the_line(capsys, files, tmp_path):
    bad = tmp_path / "broken.jsonl"
    lines = [*files["good"].read_text().splitlines()[:3], '{"id": "x", "ts": "soon"}']
    bad.write_text("\n".join(lines) + "\n")
    code, out, err = run(capsys, "--pairs", str(bad))
    assert code == 2 and out == ""
    assert f"{bad}:4:" in err and "ts" in err
    code, _, err = run(capsys, "--pairs", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "cannot open" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run(capsys, "--pairs", str(empty))
    assert code == 2 and "no paired records" in err


def test_bad_config_exits_2_naming_the_key(capsys, files, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("gates:\n  metric:\n    accuracy: {margn: 0.1}\n")
    code, _, err = run(capsys, "--pairs", str(files["good"]), "--config", str(cfg))
    assert code == 2 and "gates.metric.accuracy.margn: unknown key" in err


def test_console_entry_point_runs(files):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "replay",
            "--pairs",
            str(files["bad"]),
            "--config",
            str(files["config"]),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith("verdict: abort")


def test_replay_without_config_reads_no_slice_key_ahead(capsys, tmp_path):
    # A slice key that turns up only late in the file must not change a decision taken
    # before it appeared: the file and its prefix decide the same (as online would).
    import dataclasses

    recs = records(Scenario.slice_regression(drop=0.3, gain=0.02), 6000, seed=33)
    recs = [
        dataclasses.replace(r, slices={**r.slices, **({"region": "eu"} if i >= 5000 else {})})
        for i, r in enumerate(recs)
    ]
    docs = []
    for name, part in (("full", recs), ("prefix", recs[:5000])):
        code, out, _ = run(
            capsys, "--pairs", str(write(tmp_path / f"{name}.jsonl", part)), "--json"
        )
        assert code == 1
        docs.append(json.loads(out))
    full, prefix = docs
    assert full["decided_at"]["pairs"] < 5000
    assert (full["decided_at"], full["reason"]) == (prefix["decided_at"], prefix["reason"])


def whole_file(path: Path, config: Path | None) -> dict:
    """The general path: every record parsed first, sorted, then replayed."""
    from gates.join import LabelJoin
    from gates.replay import replay
    from proxy.cli.commands.replay import load_replay_config
    from storage.files import read_pairs

    cfg = load_replay_config(config)
    gates = cfg.gates if cfg.slice_keys is None else cfg.gates.with_slice_keys(cfg.slice_keys)
    result = replay(
        list(read_pairs(path)),
        [],
        gates=gates,
        plan=cfg.rollout,
        task=cfg.task,
        join=LabelJoin(label_window_s=cfg.label_window_s),
    )
    return json.loads(json.dumps(result.to_dict(), default=str))


def evidence(doc: dict) -> tuple:
    gates = [(g["name"], g["slice"], g["status"], g["statistic"], g["n"]) for g in doc["gates"]]
    return (doc["verdict"], doc["decided_at"], doc["reason"], gates, doc["decisions"])


@pytest.mark.parametrize("which", ["bad", "good"])
def test_the_stream_decides_as_the_whole_file(capsys, files, which):
    # The CLI streams the file as columns and stops at the decision; the general path
    # (every record parsed, then replayed) must reach the same verdict at the same pair
    # with the same statistic and n for every gate.
    path, cfg = files[which], files["config"]
    expected = whole_file(path, cfg)
    assert expected["verdict"] == ("abort" if which == "bad" else "promote")
    code, out, _ = run(capsys, "--pairs", str(path), "--config", str(cfg), "--json")
    streamed = json.loads(out)
    assert code == (1 if which == "bad" else 0)
    assert evidence(streamed) == evidence(expected)
    assert streamed["replay"]["read_to_end"] is False
    assert streamed["replay"]["pairs_read"] < expected["replay"]["pairs_read"]
    code, out, _ = run(capsys, "--pairs", str(path), "--config", str(cfg), "--json", "--read-all")
    full = json.loads(out)
    assert evidence(full) == evidence(expected) and full["replay"] == expected["replay"]


def test_a_file_out_of_time_order_is_read_whole_and_sorted(capsys, files, tmp_path):
    lines = files["bad"].read_text().splitlines()
    lines[10], lines[700] = lines[700], lines[10]
    path = tmp_path / "shuffled.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, out, _ = run(capsys, "--pairs", str(path), "--config", str(files["config"]), "--json")
    doc = json.loads(out)
    assert code == 1 and doc["replay"]["read_to_end"] is True
    assert evidence(doc) == evidence(whole_file(path, files["config"]))


def test_a_bad_line_after_the_decision_is_read_only_with_read_all(capsys, files, tmp_path):
    path = tmp_path / "tail.jsonl"
    path.write_text(files["bad"].read_text() + '{"id": "x", "ts": "later"}\n')
    n = len(path.read_text().splitlines())
    code, out, err = run(capsys, "--pairs", str(path), "--config", str(files["config"]))
    assert code == 1 and out.startswith("verdict: abort")
    code, out, err = run(
        capsys, "--pairs", str(path), "--config", str(files["config"]), "--read-all"
    )
    assert code == 2 and out == "" and f"{path}:{n}:" in err
