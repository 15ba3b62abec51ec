"""Argo Rollouts and Flagger pieces against mirrorgate's control API.

The verdict contract (DESIGN.md): ``GET /v1/rollout/verdict`` -> 200 with
``{"verdict": "continue|promote|abort", ...}`` and ``GET /v1/rollout`` with the current
``stage``, both behind the bearer token. A loopback stand-in of that API (the real one is
exercised by test_image_recipe once it lands) answers each verdict in turn, and:

* the Argo web metrics are replayed as Argo does it (args resolved, the URL fetched with
  the headers, ``jsonPath`` applied, then ``successCondition``/``failureCondition``; the
  expressions used are the subset of expr that reads the same in Python);
* the Flagger webhooks' own bash commands are run, as the loadtester runs them.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.agreed_metrics import LABEL_VALUES, LABELS, SERIES_NAMES
from tests.deploy.controllers import (
    CANARY,
    METRIC_TEMPLATES,
    PLAN,
    ROLLOUT,
    TEMPLATES,
    VERDICTS,
    docs,
    webhooks,
)
from tests.deploy.controllers import run_template as _run
from tests.deploy.controllers import run_webhook as _hook
from tests.deploy.helpers import require_tool
from tests.deploy.promql import names, promtool_syntax_errors

TOKEN = "controller-test-token"


def _run_template(
    name: str, url: str, args: dict[str, str] | None = None, token: str = TOKEN
) -> list[str]:
    return _run(name, url, token, args)


def _run_webhook(hook: dict[str, Any], url: str, token: str = TOKEN) -> Any:
    return _hook(hook, url, token)


class ControlAPI:
    """State of the stand-in control API."""

    def __init__(self) -> None:
        self.verdict = "continue"
        self.stage = "shadow"
        self.requests: list[tuple[str, str | None]] = []


@pytest.fixture()
def control_api() -> Iterator[tuple[str, ControlAPI]]:
    state = ControlAPI()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            auth = self.headers.get("Authorization")
            state.requests.append((self.path, auth))
            if auth != f"Bearer {TOKEN}":
                self._send(401, {"error": "missing or wrong bearer token"})
            elif self.path == "/v1/rollout/verdict":
                self._send(200, {"verdict": state.verdict, "stage": state.stage, "reason": "test"})
            elif self.path == "/v1/rollout":
                self._send(200, {"stage": state.stage, "verdict": state.verdict, "gates": []})
            else:
                self._send(404, {"error": "not found"})

        def _send(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


# ---- Argo Rollouts ---------------------------------------------------------------------


def test_verdict_template_maps_promote_abort_continue(control_api: tuple[str, ControlAPI]) -> None:
    url, api = control_api
    expected = {"promote": "Successful", "abort": "Failed", "continue": "Inconclusive"}
    for verdict, phase in expected.items():
        api.verdict = verdict
        assert _run_template("mirrorgate-verdict", url) == [phase]
    assert {path for path, _ in api.requests} == {"/v1/rollout/verdict"}


def test_verdict_template_pauses_rather_than_passes_on_continue() -> None:
    """continue must never count as success: Argo would promote an undecided candidate."""
    metric = TEMPLATES["mirrorgate-verdict"]["spec"]["metrics"][0]
    assert metric["failureLimit"] == 0
    assert metric["consecutiveSuccessLimit"] == 1
    assert "count" not in metric  # a reached count would end the run Successful
    assert metric["inconclusiveLimit"] > 0
    assert metric["provider"]["web"]["jsonPath"] == "{$.verdict}"


def test_abort_watch_fails_only_on_abort(control_api: tuple[str, ControlAPI]) -> None:
    url, api = control_api
    for verdict in VERDICTS:
        api.verdict = verdict
        phase = _run_template("mirrorgate-abort-watch", url)
        assert phase == (["Failed"] if verdict == "abort" else ["Successful"])


def test_templates_send_the_control_token(control_api: tuple[str, ControlAPI]) -> None:
    url, _ = control_api
    assert _run_template("mirrorgate-verdict", url, token="wrong") == ["Error"]
    for template in TEMPLATES.values():
        token_arg = next(a for a in template["spec"]["args"] if a["name"] == "control-token")
        # the same Secret key mirrorgate reads its token from
        assert token_arg["valueFrom"]["secretKeyRef"] == {
            "name": "mirrorgate-secrets",
            "key": "control-token",
        }


def _analysis_steps() -> list[dict[str, Any]]:
    return [
        s["analysis"] for s in ROLLOUT["spec"]["strategy"]["canary"]["steps"] if "analysis" in s
    ]


def test_rollout_steps_follow_the_mirrorgate_plan(control_api: tuple[str, ControlAPI]) -> None:
    """One analysis step per stage; each passes only once mirrorgate has left its stage."""
    url, api = control_api
    steps = _analysis_steps()
    assert len(steps) == len(PLAN) - 1
    for index, step in enumerate(steps):
        (ref,) = step["templates"]
        args = {a["name"]: a["value"] for a in step.get("args", [])}
        waiting_on = PLAN[index]
        for stage_index, stage in enumerate(PLAN):
            api.stage = stage
            api.verdict = "promote" if stage == "promote" else "continue"
            phases = _run_template(ref["templateName"], url, args)
            expected = "Successful" if stage_index > index else "Inconclusive"
            assert phases == [expected], (waiting_on, stage, phases)
    assert steps[-1]["templates"][0]["templateName"] == "mirrorgate-verdict"
    background = ROLLOUT["spec"]["strategy"]["canary"]["analysis"]["templates"]
    assert [t["templateName"] for t in background] == ["mirrorgate-abort-watch"]


def test_rollout_references_existing_templates_and_services() -> None:
    for step in _analysis_steps():
        for ref in step["templates"]:
            assert ref["templateName"] in TEMPLATES
    services = docs("argo-rollouts", "Service")
    canary = ROLLOUT["spec"]["strategy"]["canary"]
    assert {canary["stableService"], canary["canaryService"]} <= set(services)
    pod_labels = ROLLOUT["spec"]["template"]["metadata"]["labels"]
    for service in services.values():
        assert service["spec"]["selector"].items() <= pod_labels.items()


# ---- Flagger ---------------------------------------------------------------------------


def test_flagger_webhooks_cover_the_rollout() -> None:
    hooks = webhooks()
    assert set(hooks) == {"pre-rollout", "rollout", "confirm-promotion"}
    suite = hooks["pre-rollout"]["metadata"]["cmd"]
    assert "mirrorgate export pinned" in suite and "mirrorgate suite run" in suite
    env_names = {
        e["name"]
        for d in docs("flagger", "Deployment").values()
        if d["metadata"]["name"] == "mirrorgate-loadtester"
        for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    for hook in (hooks["rollout"], hooks["confirm-promotion"]):
        assert "${MIRRORGATE_SERVER__CONTROL_TOKEN}" in hook["metadata"]["cmd"]
        assert "MIRRORGATE_SERVER__CONTROL_TOKEN" in env_names


def test_flagger_rollout_webhook_fails_only_on_abort(control_api: tuple[str, ControlAPI]) -> None:
    require_tool("curl")
    url, api = control_api
    for verdict in VERDICTS:
        api.verdict = verdict
        result = _run_webhook(webhooks()["rollout"], url)
        assert (result.returncode != 0) == (verdict == "abort"), (verdict, result.stderr)
        assert result.stdout.strip() == verdict


def test_flagger_confirm_promotion_waits_for_promote(control_api: tuple[str, ControlAPI]) -> None:
    require_tool("curl")
    url, api = control_api
    for verdict in VERDICTS:
        api.verdict = verdict
        result = _run_webhook(webhooks()["confirm-promotion"], url)
        assert (result.returncode == 0) == (verdict == "promote"), (verdict, result.stderr)


def test_flagger_webhooks_fail_closed_without_the_token(
    control_api: tuple[str, ControlAPI],
) -> None:
    require_tool("curl")
    url, api = control_api
    api.verdict = "promote"
    for hook in (webhooks()["rollout"], webhooks()["confirm-promotion"]):
        assert _run_webhook(hook, url, token="wrong").returncode != 0


def test_flagger_metric_templates_read_agreed_gauges(promtool: str, tmp_path: Path) -> None:
    refs = {m["templateRef"]["name"]: m for m in CANARY["spec"]["analysis"]["metrics"]}
    assert set(refs) == set(METRIC_TEMPLATES)
    queries = {name: t["spec"]["query"] for name, t in METRIC_TEMPLATES.items()}
    assert promtool_syntax_errors(promtool, queries, tmp_path) == ""
    for name, query in queries.items():
        used = names(query)
        assert used.metrics <= SERIES_NAMES, (name, used.metrics - SERIES_NAMES)
        assert used.labels <= LABELS, (name, used.labels - LABELS)
        for label, op, value in used.matchers:
            if op == "=" and label in LABEL_VALUES:
                assert value in LABEL_VALUES[label]
    # a failing gate (status 2) is above the range, inconclusive (1) is not
    assert refs["mirrorgate-gate-status"]["thresholdRange"]["max"] == 1
    assert refs["mirrorgate-aborted"]["thresholdRange"]["max"] == 0
