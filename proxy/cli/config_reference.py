"""The configuration reference, generated from the model: ``mirrorgate config reference``.

A field's text is its own ``description``; fields defined without one (in ``gates``,
``storage`` and here, written before this reference existed) take theirs from
``DESCRIPTIONS``, keyed ``<DefiningClass>.<field>`` so a sub-model used twice
(champion and candidate) or inherited (every ``_Family``) is described once. Keeping the
table here, instead of editing every field definition, leaves those files to the people
adding fields to them. tests/proxy/cli/test_config_reference.py fails when a field has no
text or docs/config-reference.md differs from what this module generates.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from proxy.core.settings_load import DELIMITER, ENV_PREFIX

DESCRIPTIONS: dict[str, str] = {
    "ServerSettings.host": "address the data-plane listener binds (0.0.0.0: every interface)",
    "ServerSettings.port": "data-plane port (0: any free port, printed at start)",
    "ServerSettings.max_body_bytes": "largest request body accepted; larger ones get 413",
    "ServerSettings.control_token": "bearer token of the control API (secret: set it "
    "through MIRRORGATE_SERVER__CONTROL_TOKEN; taken as the exact string given)",
    "ServerSettings.shutdown_timeout_s": "after SIGTERM, how long in-flight requests and "
    "mirrored work may take before they are cut",
    "BackendSettings.kind": "onnx, torch (in process) or http (a remote V2 server)",
    "BackendSettings.device": "where an in-process model runs (cuda needs the gpu/torch extra)",
    "BackendSettings.timeout_ms": "per-call deadline of this model (live or mirrored); "
    "the champion answers 504 past it; gates.latency.timeout_ms, when set, must be at "
    "least the larger of both models' (checked at load)",
    "BatchingSettings.max_batch_delay_ms": "longest a request waits for others to join its batch",
    "MirrorSettings.mode": "shadow: the champion answers everything; canary: canary_weight "
    "of the traffic is answered by the candidate",
    "MirrorSettings.max_in_flight": "mirrored candidate calls running at once; more wait "
    "in the queue",
    "MirrorSettings.queue_size": "mirrored requests waiting for a slot; overflow is dropped "
    "and counted, never slowing the champion",
    "MirrorSettings.timeout_ms": "deadline of a mirrored call, capped by that model's "
    "timeout_ms (a timeout is recorded as that side's error; the latency gate censors it "
    "at gates.latency.timeout_ms)",
    "SlicesSettings.headers": "slice keys read from X-Mirrorgate-Slice-<key> request headers",
    "SlicesSettings.parameters": "slice keys read from the V2 request's parameters",
    "SlicesSettings.rules": "feature-derived slices: key -> expression over feature names, "
    "e.g. {young: 'age < 25'}",
    "FeaturesSettings.input": "input tensor whose columns are the named features "
    "(default: the first input)",
    "FeaturesSettings.names": "feature names, one per column of that tensor",
    "OutputSettings.task": "what the outputs are: class scores, a number, or an embedding",
    "StorageSettings.purge_interval_s": "how often retention purges old pairs",
    "_Family.enabled": "run this gate family",
    "_Family.blocking": "a FAIL of this family aborts the rollout (else it is advisory evidence)",
    "ToleranceSettings.min_samples": "pairs before a tolerance gate may decide",
    "RateLimit.enabled": "run this tolerance check",
    "ShiftLimit.max_rate": "largest share of pairs whose class probabilities shift beyond tol",
    "FlipLimit.max_rate": "largest share of pairs whose top class differs",
    "CollapseLimit.max_rate": "largest share of pairs where a confident champion meets an "
    "unsure candidate",
    "RegressionTolerance.max_rate": "largest share of regression pairs out of tolerance",
    "RegressionTolerance.rtol": "relative part of the tolerance (x |champion|)",
    "CosineLimit.max_rate": "largest share of embedding pairs beyond the cosine distance tol",
    "PairedMetric.enabled": "run this labelled metric gate",
    "PairedMetric.blocking": "a FAIL of this metric aborts the rollout (else advisory)",
    "EvidenceMetric.enabled": "report this metric as evidence (never blocking)",
    "EvidenceMetric.margin": "drop of this metric flagged in the evidence",
    "EceSettings.bins": "confidence bins of the expected calibration error",
    "MetricSettings.clip_calibration": "labelled pairs used to calibrate the regression clip "
    "(not tested themselves)",
    "SliceSettings.enabled": "gate every slice cell (key=value) separately",
    "SliceSettings.max_keys": "most slice keys gated when keys is None",
    "InputDriftSettings.enabled": "compute input drift warnings",
    "InputDriftSettings.max_features": "most features checked for drift",
    "InputDriftSettings.reference": "first_n: the first reference_size pairs are the "
    "reference; file: reference_path",
    "InputDriftSettings.reference_size": "pairs in the first_n reference",
    "InputDriftSettings.max_categories": "categories per categorical feature; more share one bin",
    "OutputDriftSettings.psi": "effect size threshold (PSI) of output drift; None: KS only",
    "OutputDriftSettings.bins": "quantile bins of regression outputs",
    "OutputDriftSettings.min_samples": "pairs before output drift may decide",
    "LatencySettings.quantiles": "latency quantiles compared, each in (0, 1)",
    "LatencySettings.min_samples": "pairs before the latency gate may decide",
    "ErrorSettings.max_excess_timeout_rate": "candidate timeout rate - champion's, at most",
    "ErrorSettings.min_samples": "pairs before the error gate may decide",
    "PinnedSettings.enabled": "replay the pinned-failure set against the candidate",
    "PinnedSettings.blocking": "failing the pinned set aborts the rollout (else advisory)",
    "HarvestSettings.enabled": "harvest pairs into pinned-failure candidates",
    "HarvestSettings.regression_rtol": "regression: relative part of the 'wrong' tolerance",
    "RolloutSettings.stages": "the stages in order (shadow first, then canary steps); "
    "each advances when its gates pass and its minimums are met",
    "ReplicasSettings.enabled": "share one decision between several proxies (PostgreSQL)",
    "StageSettings.name": "stage name shown in the verdict and the report",
    "StageSettings.min_duration_s": "seconds spent in this stage before advancing",
    "StageSettings.max_duration_s": "longest time in this stage (None: no limit)",
    "StageSettings.on_max_duration": "past max_duration_s: hold the stage or abort",
}


def _models_in(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(sub-model, is a list of it) inside X, X | None, list[X]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            model, many = _models_in(arg)
            if model is not None:
                return model, many
    if origin is list:
        args = get_args(annotation)
        if args:
            model, _ = _models_in(args[0])
            if model is not None:
                return model, True
    return None, False


@dataclass(frozen=True)
class FieldDoc:
    path: str
    type: str
    default: str
    description: str
    env: str | None  # None for fields inside lists (set the whole list instead)


def _owner(model: type[BaseModel], name: str) -> type:
    for cls in model.__mro__:
        if name in getattr(cls, "__annotations__", {}):
            return cls
    return model


def describe(model: type[BaseModel], name: str, info: FieldInfo) -> str:
    if info.description:
        return info.description
    return DESCRIPTIONS.get(f"{_owner(model, name).__name__}.{name}", "")


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation)
    return text.replace("typing.", "").replace("pydantic.types.", "").replace("NoneType", "None")


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "(section)"
    if hasattr(value, "get_secret_value"):
        return "(secret)"
    return json.dumps(value, default=str)


def walk(
    model: type[BaseModel], prefix: tuple[str, ...] = (), in_list: bool = False
) -> Iterator[FieldDoc]:
    for name, info in model.model_fields.items():
        sub, many = _models_in(info.annotation)
        path = (*prefix, name)
        if sub is not None and not many:
            yield from walk(sub, path, in_list)
            continue
        env = None if in_list else ENV_PREFIX + DELIMITER.join(path).upper()
        yield FieldDoc(
            ".".join(path),
            _type_name(info.annotation),
            _default(info),
            describe(model, name, info),
            env,
        )
        if sub is not None and many:
            yield from walk(sub, (*path[:-1], f"{name}[]"), True)


def defaults(model: type[BaseModel]) -> dict[str, Any]:
    """Every field's default as a nested mapping; required leaves are ``None``."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        sub, many = _models_in(info.annotation)
        if sub is not None and not many and (info.is_required() or info.default is None):
            out[name] = defaults(sub)
        elif info.is_required():
            out[name] = None
        else:
            value = info.get_default(call_default_factory=True)
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="json")
            elif isinstance(value, list):
                value = [
                    v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value
                ]
            elif hasattr(value, "get_secret_value"):
                value = None
            out[name] = value
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(model: type[BaseModel]) -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- generated by `mirrorgate config reference`; do not edit by hand -->",
        "",
        "One YAML file (`mirrorgate serve --config FILE`); every field can be overridden",
        "by the environment variable shown (prefix `MIRRORGATE_`, `__` between levels).",
        "Environment values are strings as given; numbers, booleans and lists (JSON) are",
        "converted by the field's type. Unknown keys and misspelt `MIRRORGATE_` variables",
        "are errors. `mirrorgate config validate FILE` checks a file and its model files,",
        "URLs and database URL; `mirrorgate config defaults` prints every default;",
        "`mirrorgate config schema` prints the JSON Schema.",
        "",
    ]
    section = None
    for doc in walk(model):
        top = doc.path.split(".", 1)[0]
        if top != section:
            section = top
            lines += [f"## `{top}`", "", "| key | type | default | description |"]
            lines += ["|---|---|---|---|"]
        key = f"`{doc.path}`" + (f"<br>`{doc.env}`" if doc.env else "")
        lines.append(
            f"| {key} | {_cell(doc.type)} | `{_cell(doc.default)}` | {_cell(doc.description)} |"
        )
    for i in range(len(lines) - 1, 0, -1):
        # a blank line after each table
        if lines[i].startswith("## ") and lines[i - 1] != "":
            lines.insert(i, "")
    return "\n".join(lines) + "\n"
