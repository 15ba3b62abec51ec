"""Argo Rollouts and Flagger, driven by the shipped manifests, against a live proxy.

A real ``mirrorgate serve`` process (SQLite storage, the ConfigMap's config with loopback
upstreams and smaller stage minimums, the Secret's read and write tokens) judges a
candidate behind one unchanging URL, as ``classifier-canary`` is in the cluster. The
controllers' calls come from the YAML (tests/deploy/controllers.py): Argo's Rollout steps
in order with their templates and ``podTemplateHashValue: Latest`` arguments, and
Flagger's webhooks with its payload. Two revisions go through the same proxy in a row: a
regressed one (aborted) and a good one (promoted); each verdict is bound to its revision
and a stale revision's verdict is refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import v2_upstream
from tests.deploy.agreed_metrics import LABEL_VALUES, LABELS, SERIES_NAMES
from tests.deploy.controllers import (
    CANARY,
    METRIC_TEMPLATES,
    ROLLOUT,
    SECRET,
    TEMPLATES,
    Live,
    analysis_steps,
    background_analysis,
    call_webhook,
    docs,
    mirrorgate_webhook,
    plan_stage_names,
    run_template,
    shipped_config,
    step_args,
    webhooks,
)
from tests.deploy.helpers import REPO
from tests.deploy.promql import names, promtool_syntax_errors

REGRESSED = [0.9, 0.1]  # the champion answers [0.25, 0.75]: every top class flips
GOOD = [0.25, 0.75]
CANDIDATE = "classifier-candidate"
DEADLINE_S = 120.0


# ---------------------------------------------------------------- the live proxy


def live_config(upstream: str, db: Path) -> dict[str, Any]:
    """The ConfigMap's config: loopback upstreams, SQLite, one replica, and stage
    minimums a test reaches in seconds (the plan's stage names stay the ConfigMap's)."""
    config = shipped_config()
    config["models"]["champion"].update(url=upstream, model="classifier")
    config["models"]["candidate"].update(url=upstream, model=CANDIDATE)
    config["storage"] = {"url": f"sqlite:///{db}", "capture": "failures"}
    config["replicas"] = {"enabled": False}
    config["server"].update(host="127.0.0.1", shutdown_timeout_s=5)
    config["lifecycle"]["identity_poll_s"] = 0.2
    # No labels here: the regressed revision (every top class flipped) is caught by the
    # tolerance checks, which block under the `equivalence` preset (under the shipped
    # `retrained` preset they are evidence and the labelled accuracy gate decides).
    config["gates"]["preset"] = "equivalence"
    # Latency is evidence here, not a verdict: the champion and the candidate are one
    # in-test upstream (tests/deploy/v2_upstream.py, a thread of this pytest process,
    # which also runs the client), so their latencies are not those of two servers.
    # Measured on the GOOD revision (same upstream, same answers): the candidate's p50 is
    # 2-3x the champion's in-process and 2-7x under the default shadow worker (timed in
    # the worker, which also records and gates every pair, vs the live process). Under
    # the worker, `latency.p95` (n=208, n=312 rows) and `latency.paired` (16/16: the
    # first two 8-row requests, each row then counted; gates/latency.py now counts a
    # request once) aborted the good revision in 3 of 8 whole-file runs; the rollout
    # state (stop/restart, stage, verdict per revision) was right in all of them.
    config["gates"]["latency"] = {"blocking": False}
    for stage in config["rollout"]["stages"]:
        stage.update(min_pairs=40, min_labels=0, min_duration_s=0, require=["tolerance"])
    config["rollout"].update(evaluate_every_pairs=16, evaluate_every_s=0.2)
    return config


class Serve:
    """``mirrorgate serve`` as a child process (stderr to a file: never a full pipe)."""

    def __init__(self, config: dict[str, Any], tmp: Path) -> None:
        self.path = tmp / "mirrorgate.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.log = tmp / "serve.log"
        self.proc: subprocess.Popen[str] | None = None
        self.base = ""

    def start(self, extra_env: dict[str, str] | None = None) -> Live:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORGATE_")}
        env["PYTHONPATH"] = str(REPO)
        tokens = SECRET["stringData"]
        env["MIRRORGATE_CONTROL__READ_TOKEN"] = tokens["read-token"]
        env["MIRRORGATE_CONTROL__WRITE_TOKEN"] = tokens["write-token"]
        env.update(extra_env or {})
        with self.log.open("a") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", "serve", "--config", str(self.path), "--port", "0"],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
                cwd=self.path.parent,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("mirrorgate: listening on "), line + self.log.read_text()[-3000:]
        self.base = line.split()[-1]
        live = Live(self.base, tokens)
        _wait(lambda: _status(f"{self.base}/v2/health/ready") == 200, "readiness")
        return live

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture()
def upstream() -> Iterator[str]:
    saved = dict(v2_upstream.PROBS)
    v2_upstream.PROBS[CANDIDATE] = list(REGRESSED)
    v2_upstream.CALLS.clear()
    v2_upstream.REVISIONS.clear()
    try:
        with v2_upstream.running_upstream() as url:
            yield url
    finally:
        v2_upstream.PROBS.clear()
        v2_upstream.PROBS.update(saved)
        v2_upstream.REVISIONS.clear()


@pytest.fixture()
def serve(upstream: str, tmp_path: Path) -> Iterator[Serve]:
    server = Serve(live_config(upstream, tmp_path / "mirrorgate.db"), tmp_path)
    try:
        yield server
    finally:
        server.stop()


def _status(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            status: int = r.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _get(live: Live, path: str) -> Any:
    request = urllib.request.Request(
        live.base_url + path, headers={"Authorization": f"Bearer {live.secret['read-token']}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _wait(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _learnt(live: Live, revision: str) -> None:
    """Wait until the identity watcher has seen the candidate announce ``revision``."""

    def seen() -> bool:
        status = _get(live, f"/v1/rollout?revision={revision}")
        return bool(status["candidate_wire_identity"] == f"revision:{revision}")

    _wait(seen, f"the watcher to learn {revision}")


def traffic(live: Live, requests: int = 8, rows: int = 8) -> None:
    body = json.dumps(
        {
            "inputs": [
                {"name": "INPUT0", "datatype": "FP32", "shape": [rows, 4], "data": [0.5] * rows * 4}
            ]
        }
    ).encode()
    for _ in range(requests):
        request = urllib.request.Request(
            f"{live.base_url}/v2/models/classifier/infer",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
            # the client is always answered by the champion
            assert json.loads(response.read())["outputs"][0]["data"][:2] == [0.25, 0.75]


def _settled_calls() -> int:
    """The candidate's call count once mirrored work has stopped arriving."""
    last = -1
    while True:
        now = v2_upstream.CALLS.get(CANDIDATE, 0)
        if now == last:
            return now
        last = now
        time.sleep(0.5)


# ---------------------------------------------------------------- Argo Rollouts


def drive_argo(live: Live, revision: str, seen_stages: list[str]) -> str:
    """Run the Rollout's steps as Argo does, polling each analysis step (with the
    background analysis from its startingStep on) and sending traffic between polls.
    Returns ``promoted`` or ``aborted``."""
    steps = ROLLOUT["spec"]["strategy"]["canary"]["steps"]
    background = background_analysis()
    (watch,) = background["templates"]
    watch_args = step_args(background.get("args"), revision)
    for index, step in enumerate(steps):
        if "analysis" not in step:
            continue
        (ref,) = step["analysis"]["templates"]
        args = step_args(step["analysis"].get("args"), revision)
        deadline = time.monotonic() + DEADLINE_S
        while True:
            if index >= background.get("startingStep", 0):
                phases = run_template(watch["templateName"], live, watch_args)
                assert "Error" not in phases, (revision, index, phases)
                if phases == ["Failed"]:
                    return "aborted"
            phases = run_template(ref["templateName"], live, args)
            assert "Error" not in phases, (revision, ref, phases)
            if phases == ["Failed"]:
                return "aborted"
            if phases == ["Successful"]:
                break
            stage = _get(live, f"/v1/rollout?revision={revision}")["stage"]
            if not seen_stages or seen_stages[-1] != stage:
                seen_stages.append(stage)
            assert time.monotonic() < deadline, f"step {index} of {revision} never ended"
            traffic(live)
    return "promoted"


def test_argo_two_rollouts_in_a_row_abort_then_promote(serve: Serve) -> None:
    """Done-when of issue 15 (Argo): a regressed revision, then a good one, through the
    same running proxy; each verdict bound to its revision; stale verdicts refused; the
    abort survives a restart; the promoted candidate is no longer called."""
    live = serve.start()
    regressed, good = "6d4f7b9c8", "7f9c6b5d4"
    verdict = "mirrorgate-verdict"
    # no rollout for this revision yet: refused, never another revision's verdict
    assert run_template(verdict, live, {"revision": regressed}) == ["Error"]

    stages: list[str] = []
    assert drive_argo(live, regressed, stages) == "aborted"
    assert run_template(verdict, live, {"revision": regressed}) == ["Failed"]
    assert set(stages) <= set(plan_stage_names())

    # a restart with the same experiment resumes the rollout: still aborted, and the
    # aborted candidate is not called again
    serve.stop()
    live = serve.start()
    assert run_template(verdict, live, {"revision": regressed}) == ["Failed"]
    before = _settled_calls()
    traffic(live)
    assert _settled_calls() == before

    # the next revision: its verdict is refused until its rollout starts, and the
    # regressed revision's abort never answers for it
    v2_upstream.PROBS[CANDIDATE] = list(GOOD)
    assert run_template(verdict, live, {"revision": good}) == ["Error"]
    stages = []
    assert drive_argo(live, good, stages) == "promoted"
    assert run_template(verdict, live, {"revision": good}) == ["Successful"]
    assert run_template(verdict, live, {"revision": regressed}) == ["Error"]  # stale
    # the plan's stages were walked in the ConfigMap's order, under its names
    names_seen = [s for s in stages if s in plan_stage_names()]
    assert names_seen == sorted(names_seen, key=plan_stage_names().index)
    status = _get(live, f"/v1/rollout?revision={good}")
    assert status["stages"] == plan_stage_names()
    assert status["verdict"] == "promote" and status["revision"] == good

    rollouts = _get(live, "/v1/rollouts")["rollouts"]
    by_revision = {r["revision"]: r for r in rollouts}
    assert by_revision[regressed]["status"] == "aborted"
    assert by_revision[good]["status"] == "promoted" and by_revision[good]["current"]
    assert by_revision[regressed]["rollout_id"] != by_revision[good]["rollout_id"]

    # after the promote the proxy serves the champion and stops calling the candidate
    before = _settled_calls()
    traffic(live)
    assert _settled_calls() == before


# ---------------------------------------------------------------- Flagger


def test_flagger_two_rollouts_in_a_row_abort_then_promote(serve: Serve) -> None:
    """Done-when of issue 15 (Flagger): the Canary's webhooks, with Flagger's payload and
    its checksum as the revision, give abort then promote through one proxy."""
    live = serve.start()
    start, check = mirrorgate_webhook("pre-rollout"), mirrorgate_webhook("rollout")
    rollback, confirm = mirrorgate_webhook("rollback"), mirrorgate_webhook("confirm-promotion")
    close = mirrorgate_webhook("post-rollout")
    regressed, good = "85d557f47b", "9c7b6a5d4e"

    assert call_webhook(check, live, regressed, "Progressing") == 409  # not started
    assert call_webhook(start, live, regressed, "Progressing") == 200
    deadline = time.monotonic() + DEADLINE_S
    while call_webhook(check, live, regressed, "Progressing") == 200:
        assert call_webhook(confirm, live, regressed, "Progressing") == 409  # waits
        assert time.monotonic() < deadline, "never aborted"
        traffic(live)
    assert call_webhook(rollback, live, regressed, "Progressing") == 200  # roll back now
    assert call_webhook(confirm, live, regressed, "Progressing") == 409
    assert call_webhook(close, live, regressed, "Failed") == 200

    v2_upstream.PROBS[CANDIDATE] = list(GOOD)
    # the next revision before its pre-rollout hook: refused, not the previous abort
    assert call_webhook(check, live, good, "Progressing") == 409
    assert call_webhook(rollback, live, good, "Progressing") == 409
    assert call_webhook(start, live, good, "Progressing") == 200
    deadline = time.monotonic() + DEADLINE_S
    while call_webhook(confirm, live, good, "Promoting") != 200:
        assert call_webhook(check, live, good, "Progressing") == 200
        assert call_webhook(rollback, live, good, "Progressing") == 409
        assert time.monotonic() < deadline, "never promoted"
        traffic(live)
    assert call_webhook(check, live, regressed, "Progressing") == 409  # stale
    assert call_webhook(close, live, good, "Succeeded") == 200
    rollouts = {r["revision"]: r for r in _get(live, "/v1/rollouts")["rollouts"]}
    assert rollouts[regressed]["status"] == "aborted" and rollouts[regressed]["closed"]
    assert rollouts[good]["status"] == "promoted" and rollouts[good]["closed"]
    # the webhooks' tokens are scoped: the read token cannot start a rollout
    forged = {**start, "metadata": {"token": "${MIRRORGATE_READ_TOKEN}"}}
    assert call_webhook(forged, live, "0a0a0a0a0a", "Progressing") == 403


def test_a_new_model_behind_the_same_url_is_not_judged_as_the_old_one(serve: Serve) -> None:
    """lifecycle.on_identity_change: refuse (the ConfigMap's choice): the candidate's
    revision header changes without a new rollout -> verdicts 409 until one starts."""
    v2_upstream.REVISIONS[CANDIDATE] = "v1"
    live = serve.start()
    assert call_webhook(mirrorgate_webhook("pre-rollout"), live, "v1", "Progressing") == 200
    check = mirrorgate_webhook("rollout")
    assert call_webhook(check, live, "v1", "Progressing") == 200
    _learnt(live, "v1")
    v2_upstream.REVISIONS[CANDIDATE] = "v2"
    _wait(lambda: call_webhook(check, live, "v1", "Progressing") == 409, "judging refused")
    assert call_webhook(mirrorgate_webhook("pre-rollout"), live, "v2", "Progressing") == 200
    assert call_webhook(check, live, "v2", "Progressing") == 200


# ---------------------------------------------------------------- static agreements


def test_rollout_steps_follow_the_configmap_plan() -> None:
    """One stage step per stage of the ConfigMap's plan but the last (the verdict step
    covers it), each listing exactly the later stages' names; a start step first."""
    plan = plan_stage_names()
    steps = analysis_steps()
    names_ = [s["templates"][0]["templateName"] for s in steps]
    assert names_ == [
        "mirrorgate-start",
        *["mirrorgate-stage"] * (len(plan) - 1),
        "mirrorgate-verdict",
    ]
    for index, step in enumerate(steps[1:-1]):
        args = {a["name"]: a for a in step["args"]}
        listed = [s.strip().strip("'") for s in args["stages-after"]["value"].split(",")]
        assert listed == plan[index + 1 :]
    for step in steps:
        args = {a["name"]: a for a in step["args"]}
        assert args["revision"]["valueFrom"] == {"podTemplateHashValue": "Latest"}
    background = background_analysis()
    assert [t["templateName"] for t in background["templates"]] == ["mirrorgate-abort-watch"]
    assert background["args"][0]["valueFrom"] == {"podTemplateHashValue": "Latest"}


def test_templates_use_the_fqdn_scoped_tokens_and_never_count_continue() -> None:
    for name, template in TEMPLATES.items():
        args = {a["name"]: a for a in template["spec"]["args"]}
        assert args["mirrorgate-url"]["value"].startswith("http://mirrorgate.")
        assert ".svc.cluster.local:" in args["mirrorgate-url"]["value"]
        assert "revision" in args
        token = "write-token" if name == "mirrorgate-start" else "read-token"
        assert args[token]["valueFrom"]["secretKeyRef"] == {
            "name": "mirrorgate-secrets",
            "key": token,
        }
    metric = TEMPLATES["mirrorgate-verdict"]["spec"]["metrics"][0]
    assert metric["failureLimit"] == 0 and metric["consecutiveSuccessLimit"] == 1
    assert "count" not in metric  # a reached count would end the run Successful
    assert metric["inconclusiveLimit"] > 0


def test_rollout_references_existing_templates_and_services() -> None:
    for step in analysis_steps():
        for ref in step["templates"]:
            assert ref["templateName"] in TEMPLATES
    services = docs("argo-rollouts", "Service")
    canary = ROLLOUT["spec"]["strategy"]["canary"]
    assert {canary["stableService"], canary["canaryService"]} <= set(services)
    pod_labels = ROLLOUT["spec"]["template"]["metadata"]["labels"]
    for service in services.values():
        assert service["spec"]["selector"].items() <= pod_labels.items()


def test_flagger_webhooks_cover_the_lifecycle() -> None:
    kinds = {h["type"] for h in CANARY["spec"]["analysis"]["webhooks"]}
    assert kinds == {"pre-rollout", "rollout", "rollback", "confirm-promotion", "post-rollout"}
    (suite,) = [h for h in webhooks("pre-rollout") if h["metadata"].get("type") == "bash"]
    assert "mirrorgate export pinned" in suite["metadata"]["cmd"]
    scopes = {"pre-rollout": "WRITE", "post-rollout": "WRITE"}
    for kind in kinds:
        hook = mirrorgate_webhook(kind)
        assert hook["url"].endswith(f"/v1/flagger/{kind}")
        assert hook["metadata"]["token"] == f"${{MIRRORGATE_{scopes.get(kind, 'READ')}_TOKEN}}"


def test_flagger_metric_templates_read_blocking_gates_only(promtool: str, tmp_path: Path) -> None:
    refs = {m["templateRef"]["name"]: m for m in CANARY["spec"]["analysis"]["metrics"]}
    assert set(refs) == set(METRIC_TEMPLATES)
    queries = {name: t["spec"]["query"] for name, t in METRIC_TEMPLATES.items()}
    assert promtool_syntax_errors(promtool, queries, tmp_path) == ""
    for name, query in queries.items():
        used = names(query)
        assert used.metrics <= SERIES_NAMES, (name, used.metrics - SERIES_NAMES)
        assert used.labels <= LABELS, (name, used.labels - LABELS)
        assert "mirrorgate_gate_status" not in used.metrics, "advisory gates would count"
        for label, op, value in used.matchers:
            if op == "=" and label in LABEL_VALUES:
                assert value in LABEL_VALUES[label]
    assert "mirrorgate_gate_blocking_status" in queries["mirrorgate-gate-status"]
    assert refs["mirrorgate-gate-status"]["thresholdRange"]["max"] == 1
    assert refs["mirrorgate-aborted"]["thresholdRange"]["max"] == 0


def test_canary_pods_carry_the_candidates_peak_load() -> None:
    """Argo without a traffic router: the canary ReplicaSet's share of pods (setWeight)
    must cover what mirrorgate sends the candidate at the plan's largest canary weight w:
    w served plus (1 - w) x sample_rate mirrored."""
    config = shipped_config()
    sample = config["mirror"]["sample_rate"]
    weights = [s.get("canary_weight", 0.0) for s in config["rollout"]["stages"]]
    peak = max(w + (1 - w) * sample for w in weights)
    steps = ROLLOUT["spec"]["strategy"]["canary"]["steps"]
    pod_share = max(s["setWeight"] for s in steps if "setWeight" in s) / 100
    assert peak <= pod_share, (peak, pod_share)


def test_new_rollout_mode_opens_a_rollout_for_a_new_model(serve: Serve) -> None:
    """lifecycle.on_identity_change: new_rollout: the changed revision header opens a
    rollout for the new revision by itself; the old revision's verdict is then stale."""
    v2_upstream.REVISIONS[CANDIDATE] = "v1"
    live = serve.start({"MIRRORGATE_LIFECYCLE__ON_IDENTITY_CHANGE": "new_rollout"})
    assert call_webhook(mirrorgate_webhook("pre-rollout"), live, "v1", "Progressing") == 200
    check = mirrorgate_webhook("rollout")
    _learnt(live, "v1")
    v2_upstream.REVISIONS[CANDIDATE] = "v2"

    def current() -> str:
        rollouts = _get(live, "/v1/rollouts")["rollouts"]
        return str(next(r["revision"] for r in rollouts if r["current"]))

    _wait(lambda: current() == "v2", "a rollout for v2")
    assert call_webhook(check, live, "v2", "Progressing") == 200
    assert call_webhook(check, live, "v1", "Progressing") == 409
    metrics = urllib.request.urlopen(f"{live.base_url}/metrics", timeout=10).read().decode()
    assert 'mirrorgate_rollout_identity_changes_total{action="new_rollout"} 1.0' in metrics
