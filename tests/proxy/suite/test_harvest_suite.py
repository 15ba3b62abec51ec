"""The exported suite on its own: remote V2 models, config specs, curation, bad input, and
the pytest plugin staying out of the way when not asked for."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from gates.records import ModelResult, PairRecord
from proxy.cli.main import main
from proxy.core.config import load_config
from proxy.core.errors import BadRequest
from proxy.demo.assets import INPUT_NAME, load_pool, model_path
from proxy.protocol.digest import inputs_digest
from proxy.server.app import create_app, wait_loaded
from proxy.suite.runner import (
    curate,
    export_suite,
    load_suite,
    read_results,
    record_result,
    run_suite_on,
    write_npz,
)
from storage.entities import HarvestedCase
from storage.migrate import open_database
from storage.settings import StorageSettings
from storage.store import Store

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    db = open_database(StorageSettings(url=f"sqlite:///{tmp_path / 's.sqlite'}"))
    yield Store(db)
    db.dispose()


def _misses(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pool rows the regressed candidate gets wrong and the champion right."""
    pool = load_pool()
    x, y = pool.features, pool.labels

    def top(name: str) -> np.ndarray:
        sess = ort.InferenceSession(str(model_path(name)), providers=["CPUExecutionProvider"])
        return np.asarray(sess.run(None, {INPUT_NAME: x})[0]).argmax(axis=1)

    rows = np.flatnonzero((top("candidate_regressed") != y) & (top("champion") == y))[:n]
    return x[rows], y[rows]


@pytest.fixture
def suite_dir(store: Store, tmp_path: Path) -> Path:
    x, y = _misses(3)
    for i in range(len(y)):
        inputs = {INPUT_NAME: x[i]}
        record = PairRecord(
            id=f"r{i}",
            ts=100.0 + i,
            champion=ModelResult(np.eye(10)[y[i]], 1.0),
            candidate=ModelResult(np.eye(10)[(y[i] + 1) % 10], 1.0),
            label=int(y[i]),
            inputs_digest=inputs_digest(inputs),
            inputs=inputs,
        )
        res = store.harvest(HarvestedCase(task="digits", rule="wrong_label", record=record))
        store.triage(res.case_id, "pinned", actor="ana", reason="regressed", now=200.0 + i)
    out = tmp_path / "suite"
    assert export_suite(store, out).cases == 3
    return out


async def test_remote_v2_model_and_config_spec(
    suite_dir: Path, tmp_path: Path, aiohttp_server: Any
) -> None:
    # A remote V2 server: a mirrorgate proxy serving the regressed model as its champion.
    upstream_config = load_config(
        data={
            "server": {"model_name": "digits"},
            "models": {
                "champion": {
                    "name": "regressed",
                    "kind": "onnx",
                    "path": str(model_path("candidate_regressed")),
                }
            },
        },
        env={},
    )
    app = create_app(upstream_config, gates=False)
    server = await aiohttp_server(app)
    await wait_loaded(app)
    spec = tmp_path / "remote.yaml"
    spec.write_text(
        json.dumps(
            {"name": "remote", "kind": "http", "url": str(server.make_url("")), "model": "digits"}
        )
    )
    suite = load_suite(suite_dir)
    result = await run_suite_on(suite, str(spec))
    assert result.model["kind"] == "http"
    assert len(result.failed) == 3

    # A mirrorgate config: its candidate by default, its champion on request.
    config = tmp_path / "mg.yaml"
    config.write_text(
        json.dumps(
            {
                "models": {
                    "champion": {"name": "c", "kind": "onnx", "path": str(model_path("champion"))},
                    "candidate": {
                        "name": "r",
                        "kind": "onnx",
                        "path": str(model_path("candidate_regressed")),
                    },
                }
            }
        )
    )
    assert len((await run_suite_on(suite, str(config))).failed) == 3
    champ = await run_suite_on(suite, str(config), role="champion")
    assert not champ.failed and all(c.margin > 0 for c in champ.cases)


def test_export_is_stable_and_follows_triage(store: Store, suite_dir: Path) -> None:
    before = {p.name: p.read_bytes() for p in suite_dir.rglob("*") if p.is_file()}
    manifest = json.loads((suite_dir / "manifest.json").read_text())
    assert manifest["created_at"] == 202.0  # the latest triage, not the clock
    export_suite(store, suite_dir)
    assert before == {p.name: p.read_bytes() for p in suite_dir.rglob("*") if p.is_file()}
    # dismissing a case is a change: the next export drops it, and its stale file
    first = manifest["cases"][0]["case_id"]
    store.triage(first, "dismissed", actor="bo", reason="label was wrong", now=300.0)
    export_suite(store, suite_dir)
    after = json.loads((suite_dir / "manifest.json").read_text())
    assert [c["case_id"] for c in after["cases"]] == [c["case_id"] for c in manifest["cases"][1:]]
    assert after["created_at"] == 202.0
    assert not (suite_dir / "cases" / f"case-{first}.npz").exists()


def test_curation_from_recorded_runs(suite_dir: Path) -> None:
    suite = load_suite(suite_dir)
    ids = [c.id for c in suite.cases]

    def run(name: str, passed: dict[str, float | None], ts: float) -> dict[str, Any]:
        return {
            "ts": ts,
            "model": {"name": name, "digest": name * 4},
            "cases": {
                cid: {"passed": m is not None and m >= 0, "margin": m} for cid, m in passed.items()
            },
        }

    runs = [
        run("a", {ids[0]: 0.9, ids[1]: -0.2, ids[2]: 0.3}, 1),
        run("b", {ids[0]: 0.8, ids[1]: -0.1, ids[2]: 0.9}, 2),
        run("c", {ids[0]: 0.7, ids[1]: 0.6, ids[2]: 0.6}, 3),
    ]
    cur = curate(suite, runs, recent_models=3, wide_margin=0.5, min_failures=2)
    assert [r["id"] for r in cur.retire] == [ids[0]]
    assert [(b["id"], b["failures"]) for b in cur.blockers] == [(ids[1], 2)]
    # only the last 2 models: case 2 passes both widely now
    cur = curate(suite, runs, recent_models=2, wide_margin=0.5, min_failures=3)
    assert [r["id"] for r in cur.retire] == [ids[0], ids[2]] and cur.blockers == []


async def test_cli_records_runs_and_curates(suite_dir: Path, capsys: Any) -> None:
    import asyncio

    bad, good = str(model_path("candidate_regressed")), str(model_path("champion"))
    for model in (bad, good, bad):
        await asyncio.to_thread(main, ["suite", "run", "--suite", str(suite_dir), "--model", model])
    assert len(read_results(suite_dir / "results.jsonl")) == 3
    capsys.readouterr()
    assert main(["suite", "curate", "--suite", str(suite_dir), "--json"]) == 0
    cur = json.loads(capsys.readouterr().out)
    assert len(cur["blockers"]) == 3 and cur["runs"] == 3


def test_bad_input_is_exit_2(tmp_path: Path, suite_dir: Path, capsys: Any) -> None:
    assert main(["suite", "run", "--suite", str(tmp_path / "nope"), "--model", "x.onnx"]) == 2
    assert "manifest.json" in capsys.readouterr().err
    assert main(["suite", "run", "--suite", str(suite_dir), "--model", "missing.onnx"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: onnx\nname: x\n")
    assert main(["suite", "run", "--suite", str(suite_dir), "--model", str(bad)]) == 2
    (suite_dir / "manifest.json").write_text('{"format": "mirrorgate-pinned-suite", "version": 9}')
    with pytest.raises(BadRequest, match="version"):
        load_suite(suite_dir)
    assert main(["pinned", "show", "12345", "--url", f"sqlite:///{tmp_path / 's.sqlite'}"]) == 2


def test_npz_bytes_do_not_depend_on_the_clock(tmp_path: Path) -> None:
    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.array([1, 2])}
    write_npz(tmp_path / "one.npz", arrays)
    write_npz(tmp_path / "two.npz", dict(reversed(arrays.items())))
    assert (tmp_path / "one.npz").read_bytes() == (tmp_path / "two.npz").read_bytes()
    with np.load(tmp_path / "one.npz") as data:
        assert np.array_equal(data["b"], arrays["b"])


def _plugin_args() -> list[str]:
    # Installed (make test installs the package): the pytest11 entry point loads it;
    # naming it again with -p would register the module twice.
    installed = any(
        e.name == "mirrorgate" for e in importlib.metadata.entry_points(group="pytest11")
    )
    return [] if installed else ["-p", "proxy.suite.pytest_plugin"]


def test_plugin_is_inert_without_its_options(tmp_path: Path) -> None:
    (tmp_path / "test_x.py").write_text("def test_x():\n    assert True\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            *_plugin_args(),
            "-p",
            "no:cacheprovider",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, proxy.suite.pytest_plugin; "
            "print(any(m in sys.modules for m in ('onnxruntime', 'numpy', 'proxy.suite.runner')))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.stdout.strip() == "False", proc.stderr


def test_record_result_appends(suite_dir: Path) -> None:
    from proxy.suite.runner import CaseResult, SuiteResult

    suite = load_suite(suite_dir)
    res = SuiteResult({"name": "m", "digest": "d" * 64, "kind": "onnx", "device": "cpu"}, "s", 1.0)
    res.cases.append(CaseResult(suite.cases[0].id, True, 0.5, 1, 1, "ok"))
    record_result(suite, res)
    record_result(suite, res)
    assert len(read_results(suite_dir / "results.jsonl")) == 2


async def test_torchscript_model(suite_dir: Path, tmp_path: Path) -> None:
    """The champion's softmax regression rebuilt in torch passes; with its classes
    rotated by one it fails every case."""
    import onnx
    import torch
    from onnx import numpy_helper

    init = {
        t.name: numpy_helper.to_array(t)
        for t in onnx.load(str(model_path("champion"))).graph.initializer
    }
    weight, bias = init["W1"], init["b1"]

    class Softmax(torch.nn.Module):
        def __init__(self, w: np.ndarray, b: np.ndarray) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.from_numpy(np.array(w, dtype=np.float32)))
            self.b = torch.nn.Parameter(torch.from_numpy(np.array(b, dtype=np.float32)))

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return torch.softmax(features @ self.w + self.b, dim=1)

    io = {
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
    }
    suite = load_suite(suite_dir)
    for name, w, b, failures in (
        ("same", weight, bias, 0),
        ("rotated", np.roll(weight, 1, axis=1), np.roll(bias, 1), 3),
    ):
        path = tmp_path / f"{name}.pt"
        torch.jit.save(torch.jit.script(Softmax(w, b)), str(path))
        (tmp_path / f"{name}.io.json").write_text(json.dumps(io))
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(json.dumps({"name": name, "kind": "torch", "path": path.name}))
        result = await run_suite_on(suite, str(spec))
        assert result.model["kind"] == "torch"
        assert len(result.failed) == failures, [c.detail for c in result.cases]
