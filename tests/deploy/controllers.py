"""Argo Rollouts' web metric and Flagger's bash webhook, replayed against an HTTP API.

Used by test_rollout_controllers (against a stand-in of mirrorgate's control API) and by
test_image_recipe (against the real server built from the image recipe).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.deploy.helpers import DEPLOY, manifests

PLAN = ["shadow", "canary-5%", "canary-25%", "promote"]
VERDICTS = ("continue", "promote", "abort")


def docs(folder: str, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in manifests(DEPLOY / folder) if d["kind"] == kind}


TEMPLATES = docs("argo-rollouts", "AnalysisTemplate")
ROLLOUT = docs("argo-rollouts", "Rollout")["classifier"]
CANARY = docs("flagger", "Canary")["classifier"]
METRIC_TEMPLATES = docs("flagger", "MetricTemplate")


def _condition(expression: str, result: Any) -> bool:
    """Evaluate an Argo condition; the forms used here read the same in Python."""
    assert re.fullmatch(r"[\w\s\"'=!<>\[\],%.-]+", expression), (
        f"unsupported expression: {expression}"
    )
    value = eval(expression, {"__builtins__": {}}, {"result": result, "true": True, "false": False})
    assert isinstance(value, bool)
    return value


def _phase(metric: dict[str, Any], result: Any) -> str:
    success = _condition(metric["successCondition"], result)
    failure = _condition(metric["failureCondition"], result)
    assert not (success and failure), (metric["name"], result)
    return "Successful" if success else "Failed" if failure else "Inconclusive"


def _resolve(template: dict[str, Any], args: dict[str, str]) -> dict[str, Any]:
    """Argo substitutes {{args.NAME}} in the metric's JSON when it creates the run."""
    declared = {a["name"]: a.get("value") for a in template["spec"].get("args", [])}
    values = {**{k: v for k, v in declared.items() if v is not None}, **args}
    missing = set(declared) - set(values)
    assert not missing, f"{template['metadata']['name']}: no value for {missing}"
    text = json.dumps(template["spec"]["metrics"])
    text = re.sub(
        r"\{\{\s*args\.([\w-]+)\s*\}\}", lambda m: values[m.group(1)].replace('"', '\\"'), text
    )
    metrics: dict[str, Any] = {"metrics": json.loads(text)}
    return metrics


def _measure(metric: dict[str, Any]) -> str:
    web = metric["provider"]["web"]
    headers = {h["key"]: h["value"] for h in web.get("headers", [])}
    request = urllib.request.Request(web["url"], headers=headers, method=web.get("method", "GET"))
    try:
        with urllib.request.urlopen(request, timeout=web.get("timeoutSeconds", 10)) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError:
        return "Error"
    path = re.fullmatch(r"\{\$\.([\w.]+)\}", web["jsonPath"])
    assert path, web["jsonPath"]
    for key in path.group(1).split("."):
        body = body[key]
    return _phase(metric, body)


def run_template(name: str, url: str, token: str, args: dict[str, str] | None = None) -> list[str]:
    """Phases of the template's metrics for one measurement each: Successful, Failed,
    Inconclusive, or Error (the HTTP call failed)."""
    resolved = _resolve(
        TEMPLATES[name], {"mirrorgate-url": url, "control-token": token, **(args or {})}
    )
    return [_measure(m) for m in resolved["metrics"]]


def webhooks() -> dict[str, dict[str, Any]]:
    return {h["type"]: h for h in CANARY["spec"]["analysis"]["webhooks"]}


def run_webhook(hook: dict[str, Any], url: str, token: str) -> subprocess.CompletedProcess[str]:
    """Run the webhook's command the way the loadtester's bash task does."""
    assert hook["metadata"]["type"] == "bash"
    command = hook["metadata"]["cmd"].replace("http://mirrorgate:8080", url)
    assert url in command
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "MIRRORGATE_SERVER__CONTROL_TOKEN": token,
    }
    return subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60
    )
