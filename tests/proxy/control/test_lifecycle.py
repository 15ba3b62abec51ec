"""The rollout lifecycle in process: scoped tokens, start/list/close, verdicts bound to a
revision, durable decisions across restarts, decisions the database refused, and what a
promoted candidate gets. Real ONNX models (the demo's), real SQLite; the live-proxy,
controller-driven version is tests/deploy/test_rollout_controllers.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.core.config import MirrorgateConfig, load_config
from proxy.dataplane.state import STATE
from proxy.demo.assets import model_path
from proxy.server.app import create_app, wait_loaded
from storage.errors import StorageError

READ, WRITE = "read-token", "write-token"
R = {"Authorization": f"Bearer {READ}"}
W = {"Authorization": f"Bearer {WRITE}"}
WHO = {"who": "ana", "why": "test"}


def _config(db: Path | None, **lifecycle: Any) -> MirrorgateConfig:
    data: dict[str, Any] = {
        "server": {"model_name": "digits"},
        "control": {"read_token": READ, "write_token": WRITE},
        "models": {
            "champion": {"name": "champion", "kind": "onnx", "path": str(model_path("champion"))},
            "candidate": {
                "name": "candidate",
                "kind": "onnx",
                "path": str(model_path("candidate_good")),
            },
        },
        "lifecycle": lifecycle,
    }
    if db is not None:
        data["storage"] = {"url": f"sqlite:///{db}"}
    return load_config(data=data, env={})


async def _client(config: MirrorgateConfig, *, storage: bool) -> TestClient:
    app = create_app(config, storage=storage)
    client = TestClient(TestServer(app))
    await client.start_server()
    await wait_loaded(app)
    return client


async def _json(response: Any, status: int) -> Any:
    body = await response.json()
    assert response.status == status, body
    return body


async def test_read_and_write_tokens_are_scoped() -> None:
    client = await _client(_config(None), storage=False)
    try:
        assert (await client.get("/v1/rollout/verdict")).status == 401
        await _json(await client.get("/v1/rollout/verdict", headers=R), 200)
        await _json(await client.get("/v1/rollouts", headers=R), 200)
        # reading does not allow acting
        body = await _json(
            await client.post("/v1/rollouts", json={"revision": "a"}, headers=R), 403
        )
        assert "write token" in body["error"]
        await _json(await client.post("/v1/rollout/abort", json=WHO, headers=R), 403)
        await _json(await client.post("/v1/rollouts", json={"revision": "a"}, headers=W), 201)
        # the write token reads too
        await _json(await client.get("/v1/rollout/verdict?revision=a", headers=W), 200)
    finally:
        await client.close()


async def test_start_is_idempotent_and_verdicts_belong_to_their_revision() -> None:
    client = await _client(_config(None), storage=False)
    try:
        first = await _json(
            await client.post("/v1/rollouts", json={"revision": "a"}, headers=W), 201
        )
        again = await _json(
            await client.post("/v1/rollouts", json={"revision": "a"}, headers=W), 200
        )
        assert first["rollout_id"] == again["rollout_id"] and again["created"] is False
        abort = await _json(await client.post("/v1/rollout/abort", json=WHO, headers=W), 200)
        assert abort["verdict"] == "abort" and abort["revision"] == "a"
        # the next revision is not answered with a's abort
        body = await _json(await client.get("/v1/rollout/verdict?revision=b", headers=R), 409)
        assert "stale" in body["error"]
        second = await _json(
            await client.post("/v1/rollouts", json={"revision": "b"}, headers=W), 201
        )
        assert second["rollout_id"] != first["rollout_id"]
        verdict = await _json(await client.get("/v1/rollout/verdict?revision=b", headers=R), 200)
        assert verdict["verdict"] == "continue" and verdict["revision"] == "b"
        assert verdict["rollout_id"] == second["rollout_id"]
        await _json(await client.get("/v1/rollout/verdict?revision=a", headers=R), 409)
        # a manual action naming a stale revision is refused too
        stale = {**WHO, "revision": "a"}
        await _json(await client.post("/v1/rollout/promote", json=stale, headers=W), 409)
        listed = (await _json(await client.get("/v1/rollouts", headers=R), 200))["rollouts"]
        assert [(r["revision"], r["status"], r["current"]) for r in listed] == [
            ("b", "active", True),
            ("a", "aborted", False),
            ("initial", "ended", False),  # what the proxy judged before any start
        ]
        closed = await _json(await client.post("/v1/rollouts/b/close", json={}, headers=W), 200)
        assert closed["closed"] is True and closed["status"] == "ended"
        state = client.app[STATE]
        assert state.mirror is not None and state.mirror.candidate_stopped
        # bad input: a clear 400, nothing changes
        await _json(await client.post("/v1/rollouts", json={"revision": "a b"}, headers=W), 400)
        await _json(await client.post("/v1/rollouts", json={"rev": "c"}, headers=W), 400)
    finally:
        await client.close()


async def test_require_revision_refuses_an_unnamed_verdict() -> None:
    client = await _client(_config(None, require_revision=True), storage=False)
    try:
        body = await _json(await client.get("/v1/rollout/verdict", headers=R), 400)
        assert "revision" in body["error"]
        # a person reading the state need not name it
        await _json(await client.get("/v1/rollout", headers=R), 200)
    finally:
        await client.close()


async def test_an_abort_survives_a_restart_until_a_new_rollout(tmp_path: Path) -> None:
    """Issue 14: restarting with the same experiment resumes the rollout, its stage and
    its verdict; the aborted candidate is not called again until a person starts one."""
    db = tmp_path / "m.sqlite"
    client = await _client(_config(db), storage=True)
    try:
        started = await _json(
            await client.post("/v1/rollouts", json={"revision": "r1"}, headers=W), 201
        )
        body = await _json(await client.post("/v1/rollout/abort", json=WHO, headers=W), 200)
        assert body["persisted"] is True
    finally:
        await client.close()

    client = await _client(_config(db), storage=True)
    try:
        verdict = await _json(await client.get("/v1/rollout/verdict?revision=r1", headers=R), 200)
        assert verdict["verdict"] == "abort" and verdict["rollout_id"] == started["rollout_id"]
        assert "ana" in verdict["reason"]
        state = client.app[STATE]
        assert state.mirror is not None and state.mirror.candidate_stopped
        await _json(await client.post("/v1/rollouts", json={"revision": "r2"}, headers=W), 201)
        assert not state.mirror.candidate_stopped
        verdict = await _json(await client.get("/v1/rollout/verdict?revision=r2", headers=R), 200)
        assert verdict["verdict"] == "continue"
    finally:
        await client.close()

    # and the restart after that resumes r2, not r1 and not a third rollout
    client = await _client(_config(db), storage=True)
    try:
        listed = (await _json(await client.get("/v1/rollouts", headers=R), 200))["rollouts"]
        assert [(r["revision"], r["current"]) for r in listed] == [
            ("r2", True),
            ("r1", False),
            ("initial", False),
        ]
    finally:
        await client.close()


async def test_a_decision_the_database_refused_is_retried_and_visible(tmp_path: Path) -> None:
    """Fault injection (the store's decision write raises, as during a database outage):
    the abort holds at once, readiness and the metrics say it is not persisted, and it is
    written once the database answers again."""
    client = await _client(_config(tmp_path / "m.sqlite"), storage=True)
    try:
        state = client.app[STATE]
        assert state.persistence is not None and state.rollout is not None
        store = state.persistence.store
        real = store.record_decision
        outage = {"on": True}

        def flaky(*args: Any, **kwargs: Any) -> Any:
            if outage["on"]:
                raise StorageError("database unavailable (injected)")
            return real(*args, **kwargs)

        store.record_decision = flaky  # type: ignore[method-assign]
        body = await _json(await client.post("/v1/rollout/abort", json=WHO, headers=W), 200)
        assert body["verdict"] == "abort" and body["persisted"] is False
        ready = await client.get("/v2/health/ready")
        assert ready.status == 200
        assert ready.headers["X-Mirrorgate-Decisions-Unpersisted"] == "1"
        metrics = await (await client.get("/metrics")).text()
        assert "mirrorgate_rollout_decisions_unpersisted 1.0" in metrics
        assert store.decisions(state.persistence.rollout_id) == []
        outage["on"] = False
        await state.rollout.evaluate_now()  # the next tick retries
        assert [d.verdict for d in store.decisions(state.persistence.rollout_id)] == ["abort"]
        ready = await client.get("/v2/health/ready")
        assert ready.status == 200
        assert "X-Mirrorgate-Decisions-Unpersisted" not in ready.headers
    finally:
        await client.close()


@pytest.mark.parametrize("weight", [0.0, 0.5])
async def test_what_a_promoted_candidate_serves_is_configured(weight: float) -> None:
    client = await _client(_config(None, canary_weight_after_promote=weight), storage=False)
    try:
        body = await _json(await client.post("/v1/rollout/promote", json=WHO, headers=W), 200)
        assert body["verdict"] == "promote" and body["canary_weight"] == weight
        mirror = client.app[STATE].mirror
        assert mirror is not None
        assert mirror.canary_weight == weight
        # weight 0 (the default): the promoted candidate is no longer called at all
        assert mirror.candidate_stopped == (weight == 0.0)
        metrics = await (await client.get("/metrics")).text()
        assert f"mirrorgate_rollout_canary_weight {weight}" in metrics
        assert 'mirrorgate_build_info{revision="initial"' in metrics
        assert "process_cpu_seconds_total" in metrics
    finally:
        await client.close()
