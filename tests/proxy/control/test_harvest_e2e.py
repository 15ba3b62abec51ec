"""Pinned-failure harvesting end to end, through the real proxy with storage on SQLite.

Real demo ONNX models behind the real aiohttp proxy: labelled traffic in which the
regressed candidate misclassifies some inputs -> harvested with evidence -> pinned over
HTTP -> exported (twice: identical bytes) -> ``suite run`` fails on the regressed model
and passes on a fixed one -> the pytest plugin reports the same cases -> a pinned case
seen live and missed by the candidate aborts at once, and a new rollout of the regressed
candidate aborts before any traffic is mirrored.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from aiohttp.test_utils import TestClient

from proxy.cli.main import main
from proxy.control.harvest import Harvester
from proxy.core.config import MirrorgateConfig, load_config
from proxy.dataplane.state import HARVESTER, STATE
from proxy.demo.assets import INPUT_NAME, load_pool, model_path
from proxy.server.app import create_app, wait_loaded

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPO = Path(__file__).resolve().parents[3]


def _config(url: str, candidate: str, candidate_name: str | None = None) -> MirrorgateConfig:
    return load_config(
        data={
            "server": {"model_name": "digits", "control_token": TOKEN},
            "models": {
                "champion": {
                    "name": "champion",
                    "kind": "onnx",
                    "path": str(model_path("champion")),
                },
                "candidate": {
                    "name": candidate_name or candidate,
                    "kind": "onnx",
                    "path": str(model_path(candidate)),
                },
            },
            "slices": {"headers": ["platform"]},
            "storage": {"url": url},
            # This test is about the pinned set: the statistical gates only watch (a few
            # dozen pairs decide nothing), the label rule alone harvests (a label-free
            # catch would keep evidence without the label).
            "gates": {
                "metric": {"blocking": False},
                "slices": {"enabled": False},
                "tolerance": {"blocking": False},
                "drift": {"output": {"blocking": False}},
                "latency": {"blocking": False},
                "errors": {"blocking": False},
                "harvest": {"disagreement": False},
            },
            "rollout": {
                "stages": [{"name": "shadow", "min_pairs": 100_000, "min_duration_s": 0}],
            },
        },
        env={},
    )


def _predict(name: str, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(model_path(name)), providers=["CPUExecutionProvider"])
    out = sess.run(None, {INPUT_NAME: x})[0]
    return np.asarray(out).argmax(axis=1)


@pytest.fixture(scope="module")
def rows() -> dict[str, Any]:
    """Mobile pool rows: where only the regressed candidate errs, where all are right,
    where only the champion errs."""
    pool = load_pool()
    idx = pool.rows_of("mobile")
    x, y = pool.features[idx], pool.labels[idx]
    champ, bad, good = (
        _predict(m, x) for m in ("champion", "candidate_regressed", "candidate_good")
    )
    only_bad = np.flatnonzero((bad != y) & (champ == y) & (good == y))[:3]
    all_ok = np.flatnonzero((bad == y) & (champ == y) & (good == y))[:3]
    champ_wrong = np.flatnonzero((champ != y) & (bad == y))[:1]
    assert len(only_bad) == 3 and len(all_ok) == 3 and len(champ_wrong) == 1
    return {"x": x, "y": y, "only_bad": only_bad, "all_ok": all_ok, "champ_wrong": champ_wrong}


async def _start(aiohttp_client: Any, config: MirrorgateConfig) -> TestClient:
    app = create_app(config, storage=True)
    client: TestClient = await aiohttp_client(app)
    await wait_loaded(app)
    return client


async def _infer(client: TestClient, rid: str, x: np.ndarray) -> None:
    body = {
        "id": rid,
        "inputs": [{"name": INPUT_NAME, "shape": [1, 64], "datatype": "FP32", "data": x.tolist()}],
    }
    resp = await client.post(
        "/v2/models/digits/infer", json=body, headers={"X-Mirrorgate-Slice-platform": "mobile"}
    )
    assert resp.status == 200, await resp.text()


async def _settle(client: TestClient) -> None:
    """Mirrored work done, pairs and labels through the gates, harvest writes done."""
    state = client.app[STATE]  # type: ignore[index]
    assert state.mirror is not None and state.rollout is not None
    for _ in range(500):
        if not state.mirror.in_flight and not state.mirror.queued:
            break
        await asyncio.sleep(0.01)
    await state.rollout.evaluate_now()
    harvester = state.extras[HARVESTER]
    assert isinstance(harvester, Harvester)
    await asyncio.to_thread(harvester.flush)


def _run_cli(*argv: str) -> int:
    return main(list(argv))


def _plugin_args() -> list[str]:
    installed = any(
        e.name == "mirrorgate" for e in importlib.metadata.entry_points(group="pytest11")
    )
    return [] if installed else ["-p", "proxy.suite.pytest_plugin"]


def _pytest(tmp: Path, suite: Path, model: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rA",
            "-p",
            "no:cacheprovider",
            *_plugin_args(),
            "--rootdir",
            str(tmp),
            "--mirrorgate-suite",
            str(suite),
            "--mirrorgate-model",
            str(model),
        ],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


async def test_harvest_pin_export_suite_plugin_and_pinned_gate(
    aiohttp_client: Any, rows: dict[str, Any], tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'mg.sqlite'}"
    x, y = rows["x"], rows["y"]
    picked = [*rows["only_bad"], *rows["all_ok"], *rows["champ_wrong"]]

    # 1. labelled traffic through the proxy, the regressed candidate in shadow
    client = await _start(aiohttp_client, _config(url, "candidate_regressed"))
    for i in picked:
        await _infer(client, f"r-{i}", x[i])
    await _settle(client)
    labels = [{"id": f"r-{i}", "label": int(y[i])} for i in picked]
    assert (await client.post("/v1/feedback", json=labels, headers=AUTH)).status == 202
    await _settle(client)

    # 2. harvested with evidence: each pair one of the models got wrong, nothing else
    resp = await client.get("/v1/pinned", params={"status": "candidate"}, headers=AUTH)
    assert resp.status == 200
    cases = (await resp.json())["cases"]
    by_request = {c["evidence"]["request_id"]: c for c in cases}
    expected_ids = {f"r-{i}" for i in (*rows["only_bad"], *rows["champ_wrong"])}
    assert set(by_request) == expected_ids
    for i in rows["only_bad"]:
        case = by_request[f"r-{i}"]
        assert case["rule"] == "wrong_label"
        assert case["evidence"]["label"] == int(y[i])
        assert case["evidence"]["slices"] == {"platform": "mobile"}
        assert np.argmax(case["evidence"]["champion"]["output"]) == y[i]
        assert np.argmax(case["evidence"]["candidate"]["output"]) != y[i]
        full = await (await client.get(f"/v1/pinned/{case['id']}", headers=AUTH)).json()
        assert full["evidence"]["inputs"] == {INPUT_NAME: [64]}  # the stored tensors
        assert case["champion"]["name"] == "champion"
        assert case["candidate"]["name"] == "candidate_regressed"
        assert case["rollout_id"] and case["recurrence_count"] == 1

    # 3. dedup: the same input again (another request id) is a recurrence, not a case
    again = rows["only_bad"][0]
    await _infer(client, "again-1", x[again])
    await _settle(client)
    fb = [{"id": "again-1", "label": int(y[again])}]
    assert (await client.post("/v1/feedback", json=fb, headers=AUTH)).status == 202
    await _settle(client)
    cases = (await (await client.get("/v1/pinned", headers=AUTH)).json())["cases"]
    assert len(cases) == len(expected_ids)
    first = {c["evidence"]["request_id"]: c for c in cases}[f"r-{again}"]
    assert first["recurrence_count"] == 2

    # 4. triage over HTTP: who and why required; pin the candidate's misses, dismiss
    # the champion's (the candidate was right there)
    cid = first["id"]
    resp = await client.post(
        f"/v1/pinned/{cid}", json={"action": "pin", "who": "ana"}, headers=AUTH
    )
    assert resp.status == 400 and "why" in (await resp.json())["error"]
    resp = await client.post(
        f"/v1/pinned/{cid}", json={"action": "freeze", "who": "a", "why": "b"}, headers=AUTH
    )
    assert resp.status == 400
    resp = await client.post(
        "/v1/pinned/99999", json={"action": "pin", "who": "a", "why": "b"}, headers=AUTH
    )
    assert resp.status == 404
    assert (await client.get("/v1/pinned", headers={})).status == 401
    pinned_ids = []
    for i in rows["only_bad"]:
        case = by_request[f"r-{i}"]
        resp = await client.post(
            f"/v1/pinned/{case['id']}",
            json={"action": "pin", "who": "ana", "why": "mobile misread"},
            headers=AUTH,
        )
        assert resp.status == 200
        body = await resp.json()
        assert body["status"] == "pinned" and body["expected_label"] == int(y[i])
        pinned_ids.append(case["id"])
    dismissed = by_request[f"r-{rows['champ_wrong'][0]}"]["id"]
    resp = await client.post(
        f"/v1/pinned/{dismissed}",
        json={"action": "dismiss", "who": "bo", "why": "champion's miss, not the candidate's"},
        headers=AUTH,
    )
    assert (await resp.json())["status"] == "dismissed"
    show = await (await client.get(f"/v1/pinned/{dismissed}", headers=AUTH)).json()
    assert [(h["actor"], h["from"], h["to"]) for h in show["history"]] == [
        ("harvest", None, "candidate"),
        ("bo", "candidate", "dismissed"),
    ]

    # 5. a pinned case seen live and missed by the candidate aborts at once
    state = client.app[STATE]  # type: ignore[index]
    assert state.rollout is not None and state.mirror is not None
    assert state.rollout.current().verdict != "abort"
    await _infer(client, "live-1", x[rows["only_bad"][1]])
    await _settle(client)
    verdict = await (await client.get("/v1/rollout/verdict", headers=AUTH)).json()
    assert verdict["verdict"] == "abort"
    assert "pinned" in verdict["reason"]
    assert state.mirror.candidate_stopped
    full = await (await client.get("/v1/rollout", headers=AUTH)).json()
    assert full["harvest"]["pinned_missed"] == 1 and full["harvest"]["pinned_cases"] == 3
    pairs_before = state.rollout.engine.pairs
    await _infer(client, "after-abort", x[rows["all_ok"][0]])
    await _settle(client)
    assert state.rollout.engine.pairs == pairs_before  # the candidate is no longer mirrored
    await client.close()

    # 6. the CLI sees the same cases; export twice -> identical bytes
    assert _run_cli("pinned", "list", "--url", url) == 0
    with pytest.raises(SystemExit):  # --why is required
        _run_cli("pinned", "pin", str(dismissed), "--url", url, "--who", "x")
    suite = tmp_path / "suite"
    assert _run_cli("export", "pinned", "--url", url, "--out", str(suite)) == 0
    first_bytes = {p.relative_to(suite): p.read_bytes() for p in sorted(suite.rglob("*.*"))}
    assert _run_cli("export", "pinned", "--url", url, "--out", str(suite)) == 0
    second_bytes = {p.relative_to(suite): p.read_bytes() for p in sorted(suite.rglob("*.*"))}
    assert first_bytes == second_bytes
    manifest = json.loads((suite / "manifest.json").read_text())
    assert manifest["format"] == "mirrorgate-pinned-suite" and manifest["version"] == 1
    assert sorted(c["case_id"] for c in manifest["cases"]) == sorted(pinned_ids)
    assert manifest["created_at"] > 0
    names = {f"case-{i}" for i in pinned_ids}

    # 7. suite run: the regressed model fails exactly the pinned cases, a fixed one passes
    bad_model = model_path("candidate_regressed")
    good_model = model_path("candidate_good")
    # (in a thread: the CLI runs its own event loop)
    run = ("suite", "run", "--suite", str(suite), "--model")
    code = await asyncio.to_thread(_run_cli, *run, str(bad_model), "--json")
    assert code == 1
    code = await asyncio.to_thread(_run_cli, *run, str(good_model))
    assert code == 0
    runs = [json.loads(line) for line in (suite / "results.jsonl").read_text().splitlines()]
    assert [sorted(k for k, v in r["cases"].items() if not v["passed"]) for r in runs] == [
        sorted(names),
        [],
    ]

    # 8. the pytest plugin reports the same cases
    proc = _pytest(tmp_path, suite, bad_model)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = {
        line.split("mirrorgate[")[1].split("]")[0]
        for line in proc.stdout.splitlines()
        if line.startswith("FAILED")
    }
    assert failed == names, proc.stdout
    proc = _pytest(tmp_path, suite, good_model)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(names)} passed" in proc.stdout

    # 9. a new rollout of the regressed candidate aborts before any traffic is mirrored
    client = await _start(aiohttp_client, _config(url, "candidate_regressed", "regressed-v2"))
    state = client.app[STATE]  # type: ignore[index]
    assert state.rollout is not None and state.mirror is not None
    assert state.rollout.current().verdict == "abort"
    assert state.mirror.candidate_stopped
    await _infer(client, "first", x[rows["all_ok"][1]])
    await _settle(client)
    assert state.rollout.engine.pairs == 0
    await client.close()

    # ... and a fixed candidate starts and mirrors normally
    client = await _start(aiohttp_client, _config(url, "candidate_good"))
    state = client.app[STATE]  # type: ignore[index]
    assert state.rollout is not None and state.mirror is not None
    assert state.rollout.current().verdict != "abort"
    assert not state.mirror.candidate_stopped
    await _infer(client, "first", x[rows["all_ok"][1]])
    await _settle(client)
    assert state.rollout.engine.pairs == 1
    await client.close()
