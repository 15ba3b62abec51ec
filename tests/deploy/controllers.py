"""Argo Rollouts' web metrics and Flagger's webhooks, replayed from the shipped YAML.

Nothing here copies a name, URL or argument from the manifests: the templates, steps,
webhooks and the ConfigMap's plan are parsed from deploy/, and each call is made the way
the controller makes it against a live ``mirrorgate serve``:

* Argo: the AnalysisTemplate's args resolved (``valueFrom.podTemplateHashValue: Latest``
  becomes the revision under test; ``valueFrom.secretKeyRef`` the token the Secret key
  names), ``{{args.X}}`` substituted, the web metric's method, URL, headers and
  ``jsonBody`` sent, ``jsonPath`` applied, then ``successCondition`` /
  ``failureCondition`` evaluated. A non-2xx answer is a measurement Error.
* Flagger: Flagger's webhook payload ``{name, namespace, phase, checksum, metadata}``
  POSTed to the webhook's URL; a 2xx answer is success.

Only the scheme, host and port of the manifests' URLs are replaced by the live proxy's
(the tests assert that the rest is the in-cluster FQDN on the ConfigMap's port).
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from tests.deploy.helpers import DEPLOY, manifests

VERDICTS = ("continue", "promote", "abort")
# The in-cluster address the manifests must use (Argo's controller and Flagger call from
# their own namespaces): http://<service>.<namespace>.svc.cluster.local:<port>
FQDN = re.compile(r"http://mirrorgate\.[a-z0-9-]+\.svc\.cluster\.local:(\d+)")


def docs(folder: str, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in manifests(DEPLOY / folder) if d["kind"] == kind}


TEMPLATES = docs("argo-rollouts", "AnalysisTemplate")
ROLLOUT = docs("argo-rollouts", "Rollout")["classifier"]
CANARY = docs("flagger", "Canary")["classifier"]
METRIC_TEMPLATES = docs("flagger", "MetricTemplate")
CONFIGMAP = docs("kubernetes", "ConfigMap")["mirrorgate-config"]
SECRET = docs("kubernetes", "Secret")["mirrorgate-secrets"]


def shipped_config() -> dict[str, Any]:
    """The ConfigMap's mirrorgate.yaml as a mapping."""
    loaded: dict[str, Any] = yaml.safe_load(CONFIGMAP["data"]["mirrorgate.yaml"])
    return loaded


def plan_stage_names() -> list[str]:
    return [s["name"] for s in shipped_config()["rollout"]["stages"]]


# ---------------------------------------------------------------- Argo's expressions


class _Obj(dict[str, Any]):
    """A JSON object whose keys read as attributes (expr's ``result.stage``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return _wrap(self[name])
        except KeyError as exc:
            raise AttributeError(name) from exc


def _wrap(value: Any) -> Any:
    return _Obj(value) if isinstance(value, dict) else value


def condition(expression: str, result: Any) -> bool:
    """Evaluate the subset of Argo's expr the templates use: comparisons, ``in [...]``,
    ``||``/``&&``, string literals, ``result`` and ``result.field``."""
    assert re.fullmatch(r"""[\w\s"'=!<>\[\],%.|&-]+""", expression), expression
    python = expression.replace("||", " or ").replace("&&", " and ")
    value = eval(
        python, {"__builtins__": {}}, {"result": _wrap(result), "true": True, "false": False}
    )
    assert isinstance(value, bool), expression
    return value


# ---------------------------------------------------------------- Argo's web metric


@dataclass(frozen=True)
class Live:
    """The live proxy and the Secret's tokens (by Secret key)."""

    base_url: str
    secret: Mapping[str, str]

    def rebase(self, url: str) -> str:
        match = FQDN.match(url)
        assert match, f"not the service's in-cluster FQDN: {url}"
        assert int(match.group(1)) == shipped_config()["server"]["port"], url
        return self.base_url + url[match.end() :]


def step_args(step_args: list[dict[str, Any]] | None, revision: str) -> dict[str, str]:
    """A Rollout step's args as Argo resolves them for the new ReplicaSet."""
    out = {}
    for arg in step_args or []:
        if "value" in arg:
            out[arg["name"]] = arg["value"]
        else:
            source = arg["valueFrom"]
            assert source == {"podTemplateHashValue": "Latest"}, source
            out[arg["name"]] = revision
    return out


def _resolve(template: dict[str, Any], args: Mapping[str, str], live: Live) -> list[Any]:
    values: dict[str, str] = {}
    for arg in template["spec"].get("args", []):
        name = arg["name"]
        if name in args:
            values[name] = args[name]
        elif "value" in arg:
            values[name] = arg["value"]
        elif "valueFrom" in arg:
            ref = arg["valueFrom"]["secretKeyRef"]
            assert ref["name"] == SECRET["metadata"]["name"], ref
            values[name] = live.secret[ref["key"]]
        else:
            raise AssertionError(f"{template['metadata']['name']}: no value for arg {name}")
    text = json.dumps(template["spec"]["metrics"])

    def substitute(match: re.Match[str]) -> str:
        return json.dumps(values[match.group(1)])[1:-1]

    text = re.sub(r"\{\{\s*args\.([\w-]+)\s*\}\}", substitute, text)
    metrics: list[Any] = json.loads(text)
    return metrics


def _json_path(path: str, body: Any) -> Any:
    if path == "{$}":
        return body
    match = re.fullmatch(r"\{\$\.([\w.]+)\}", path)
    assert match, path
    for key in match.group(1).split("."):
        body = body[key]
    return body


def measure(metric: dict[str, Any], live: Live) -> str:
    """One measurement: Successful, Failed, Inconclusive, or Error (HTTP failure)."""
    web = metric["provider"]["web"]
    headers = {h["key"]: h["value"] for h in web.get("headers", [])}
    data = None
    if "jsonBody" in web:
        data = json.dumps(web["jsonBody"]).encode()
        headers.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(
        live.rebase(web["url"]), data=data, headers=headers, method=web.get("method", "GET")
    )
    try:
        with urllib.request.urlopen(request, timeout=web.get("timeoutSeconds", 10)) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError:
        return "Error"
    result = _json_path(web["jsonPath"], body)
    success = condition(metric["successCondition"], result)
    failure = condition(metric["failureCondition"], result)
    assert not (success and failure), (metric["name"], result)
    return "Successful" if success else "Failed" if failure else "Inconclusive"


def run_template(name: str, live: Live, args: Mapping[str, str]) -> list[str]:
    """One measurement of each of the template's metrics."""
    return [measure(m, live) for m in _resolve(TEMPLATES[name], args, live)]


def analysis_steps() -> list[dict[str, Any]]:
    return [
        s["analysis"] for s in ROLLOUT["spec"]["strategy"]["canary"]["steps"] if "analysis" in s
    ]


def background_analysis() -> dict[str, Any]:
    analysis: dict[str, Any] = ROLLOUT["spec"]["strategy"]["canary"]["analysis"]
    return analysis


# ---------------------------------------------------------------- Flagger's webhooks


def webhooks(kind: str) -> list[dict[str, Any]]:
    return [h for h in CANARY["spec"]["analysis"]["webhooks"] if h["type"] == kind]


def mirrorgate_webhook(kind: str) -> dict[str, Any]:
    (hook,) = [h for h in webhooks(kind) if h["metadata"].get("type") != "bash"]
    return hook


def call_webhook(hook: dict[str, Any], live: Live, checksum: str, phase: str) -> int:
    """POST Flagger's payload to the hook; returns the HTTP status. The metadata's
    ``${MIRRORGATE_..._TOKEN}`` placeholders get the Secret's tokens, as deploy-time
    substitution does."""
    placeholders = {
        "${MIRRORGATE_READ_TOKEN}": live.secret["read-token"],
        "${MIRRORGATE_WRITE_TOKEN}": live.secret["write-token"],
    }
    metadata = {k: placeholders.get(v, v) for k, v in (hook.get("metadata") or {}).items()}
    payload = {
        "name": CANARY["metadata"]["name"],
        "namespace": "ml-serving",
        "phase": phase,
        "checksum": checksum,
        "metadata": metadata,
    }
    request = urllib.request.Request(
        live.rebase(hook["url"]),
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


def quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")
