"""A failing champion: the client gets a clear 5xx with the reason, and no pair is recorded.

The live answer is the champion's; when it has none there is nothing to compare the
candidate to, so nothing may reach the sinks as if the request had succeeded.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.faults.helpers import body, own_upstream
from tests.proxy.conftest import LIVE_PATHS, make_config


@pytest.fixture(params=LIVE_PATHS)
def live_path(request: pytest.FixtureRequest) -> str:
    """Every test here holds on both live paths (``server.live_path``)."""
    return str(request.param)


# mode -> (status, words the error message must contain)
# Mirrorgate's own errors (the champion gave no answer). An answer the champion gave,
# an error status or a body that is no V2 response, passes through as it wrote it
# (PASSED_AS_WRITTEN): the client sees what it would see without the proxy.
FAILURES = {
    "down": (502, ("upstream", "connection failed", "refused")),
    "hang": (504, ("champion", "timed out")),
    "crash": (502, ("upstream", "connection failed", "payload")),
}
PASSED_AS_WRITTEN = {"error": 500, "garbage": 200, "non_json": 200}
# Well-formed answers with bad content reach the client as the champion gave them (the
# proxy is transparent: production behaves as without it), but the pair carries the
# champion's error, so no gate counts it as a successful comparison.
PASSED_THROUGH = {"nan": "non_finite_output", "wrong_rows": "shape_mismatch"}


@pytest.mark.parametrize("mode", sorted(FAILURES))
async def test_champion_failure_is_a_clear_5xx_and_records_nothing(
    start_upstream: Any, start_proxy: Any, mode: str
) -> None:
    status, words = FAILURES[mode]
    champion = await own_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    try:
        config = make_config(champion.url, candidate.url, models={"champion": {"timeout_ms": 300}})
        proxy = await start_proxy(config)
        if mode == "down":
            await champion.close()
        else:
            champion.upstream.set_fault(mode)
        for i in range(3):
            resp = await proxy.client.post("/v2/models/classifier/infer", json=body(i))
            text = await resp.text()
            assert resp.status == status, text
            error = (await resp.json())["error"]
            assert all(w in error.lower() for w in words), error
        assert (
            proxy.metric("mirrorgate_proxy_requests_total", role="champion", code=str(status)) == 3
        )
        # The proxy keeps serving once the champion recovers; only that pair is recorded.
        if mode != "down":
            champion.upstream.set_fault("normal")
            champion.upstream.release()
            resp = await proxy.client.post("/v2/models/classifier/infer", json=body(99))
            assert resp.status == 200, await resp.text()
        await proxy.state.mirror.drain(10)
        ids = {r.id for r in proxy.sink.records}
        assert ids == (set() if mode == "down" else {"r99"})
        assert all(r.champion.error is None for r in proxy.sink.records)
    finally:
        await champion.close()


@pytest.mark.parametrize("mode", sorted(PASSED_AS_WRITTEN))
async def test_champion_answers_pass_through_as_written_and_record_nothing(
    start_upstream: Any, start_proxy: Any, mode: str
) -> None:
    champion = await own_upstream(seed=1)
    candidate = await start_upstream(seed=2)
    try:
        proxy = await start_proxy(make_config(champion.url, candidate.url))
        champion.upstream.set_fault(mode)
        for i in range(3):
            resp = await proxy.client.post("/v2/models/classifier/infer", json=body(i))
            raw = await resp.read()
            direct = await proxy.client.session.post(
                f"{champion.url}/v2/models/model/infer", json=body(i)
            )
            assert (resp.status, raw) == (PASSED_AS_WRITTEN[mode], await direct.read())
        champion.upstream.set_fault("normal")
        resp = await proxy.client.post("/v2/models/classifier/infer", json=body(99))
        assert resp.status == 200, await resp.text()
        await proxy.state.mirror.drain(10)
        # No pair for an error status; a 200 that is no V2 answer cannot be decoded.
        assert {r.id for r in proxy.sink.records} == {"r99"}
        undecodable = proxy.metric("mirrorgate_shadow_dropped_total", reason="undecodable")
        assert undecodable == (3 if mode != "error" else 0)
    finally:
        await champion.close()


@pytest.mark.parametrize("mode", sorted(PASSED_THROUGH))
async def test_bad_champion_content_is_served_as_is_but_never_recorded_as_success(
    start_upstream: Any, start_proxy: Any, mode: str
) -> None:
    champion = await start_upstream(seed=1, mode=mode)
    candidate = await start_upstream(seed=2)
    proxy = await start_proxy(make_config(champion.url, candidate.url))
    for i in range(3):
        resp = await proxy.client.post("/v2/models/classifier/infer", json=body(i))
        assert resp.status == 200, await resp.text()
    await proxy.state.mirror.drain(10)
    records = proxy.sink.records
    assert len(records) == 3
    assert {(r.champion.error or "").split(":", 1)[0] for r in records} == {PASSED_THROUGH[mode]}
    assert all(r.champion.output is None and r.candidate.error is None for r in records)
