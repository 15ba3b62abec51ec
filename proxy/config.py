"""The one configuration file: YAML validated by pydantic v2.

Unknown keys and bad values are errors naming the key's path. Any field can be
overridden by an environment variable ``MIRRORGATE_<SECTION>__<FIELD>[__<SUBFIELD>...]``
(double underscore between levels, as pydantic-settings and Dynaconf spell nesting); the
value is parsed as a YAML scalar, so ``MIRRORGATE_SERVER__PORT=9000`` is an int.
Variables without a double underscore (``MIRRORGATE_CONFIG``) are not overrides.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from gates.settings import GatesSettings, RolloutSettings
from proxy.breaker import CircuitSettings
from proxy.errors import ConfigError
from proxy.limits import ServerLimits
from storage.settings import StorageSettings

ENV_PREFIX = "MIRRORGATE_"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchingSettings(_Strict):
    """Dynamic micro-batching of in-process backends (Triton's dynamic batcher)."""

    max_batch_size: int = Field(1, ge=1, description="1 disables batching")
    max_batch_delay_ms: float = Field(2.0, ge=0)


class BackendSettings(_Strict):
    name: str = Field(..., min_length=1, description="model identity recorded with pairs")
    kind: Literal["onnx", "torch", "http"]
    path: str | None = Field(None, description="onnx file, TorchScript or torch.export file")
    factory: str | None = Field(None, description="torch: 'module:callable' returning a Module")
    url: str | None = Field(None, description="http: base URL of a V2 server")
    model: str | None = Field(None, description="http: model name on the upstream server")
    device: Literal["cpu", "cuda"] = "cpu"
    timeout_ms: float = Field(1000.0, gt=0)
    threads: int | None = Field(None, ge=1, description="intra-op threads (onnx, torch)")
    batching: BatchingSettings = BatchingSettings()

    @model_validator(mode="after")
    def _check_source(self) -> BackendSettings:
        if self.kind == "onnx" and not self.path:
            raise ValueError("an onnx backend needs 'path'")
        if self.kind == "torch" and not (self.path or self.factory):
            raise ValueError("a torch backend needs 'path' or 'factory'")
        if self.kind == "http" and not self.url:
            raise ValueError("an http backend needs 'url'")
        return self


class ModelsSettings(_Strict):
    champion: BackendSettings
    candidate: BackendSettings | None = None


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    model_name: str = Field("model", min_length=1, description="name served under /v2/models")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    control_token: SecretStr | None = None
    shutdown_timeout_s: float = Field(10.0, ge=0)
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        description="after SIGTERM, keep serving with readiness 503 this long (or until a "
        "second signal) so load balancers stop routing before the listener closes",
    )
    limits: ServerLimits = ServerLimits()
    control_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="serve the control plane (/v1/...) and /metrics on their own listener "
        "at this port (0: any free port), not on the data port; unset: one listener",
    )
    nonfinite_inputs: list[str] = Field(
        [],
        description="inputs whose JSON data may carry NaN/Infinity ('*': all); every "
        "other input refuses them with a 400",
    )
    metrics_token: SecretStr | None = Field(
        None, description="when set, /metrics wants Authorization: Bearer <metrics_token>"
    )


class MirrorSettings(_Strict):
    mode: Literal["shadow", "canary"] = "shadow"
    canary_weight: float = Field(0.0, ge=0.0, le=1.0, description="share served by candidate")
    sticky_header: str | None = Field(None, description="route by a hash of this header")
    sample_rate: float = Field(1.0, ge=0.0, le=1.0, description="share of requests mirrored")
    max_in_flight: int = Field(64, ge=1)
    queue_size: int = Field(1024, ge=0)
    max_queue_bytes: int = Field(
        256 * 1024 * 1024, ge=0, description="input bytes held by queued mirror work"
    )
    timeout_ms: float = Field(2000.0, gt=0)
    shadow_after_abort: bool = Field(
        False,
        description="keep mirroring to an aborted candidate (never serving it): more "
        "evidence and harvested failures, at the candidate's cost",
    )
    circuit: CircuitSettings = CircuitSettings()


class SlicesSettings(_Strict):
    """Where a request's slice keys come from.

    ``headers``: keys read from ``X-Mirrorgate-Slice-<key>`` headers; ``parameters``:
    keys read from the V2 request's ``parameters``; ``rules``: feature-derived slices,
    ``{"young": "age < 25"}`` gives slice key ``young`` with value ``true``/``false``.
    """

    headers: list[str] = []
    parameters: list[str] = []
    rules: dict[str, str] = {}


class FeaturesSettings(_Strict):
    """Named features for drift gates and slice rules: columns of one input tensor."""

    input: str | None = None
    names: list[str] = []


class OutputSettings(_Strict):
    task: Literal["classification", "regression", "embedding"] = "classification"
    output: str | None = Field(None, description="output tensor the gates read; default first")


class ReplicasSettings(_Strict):
    """Several proxies, one decision (docs/replicas.md). Needs PostgreSQL storage.

    Every replica persists its cumulative gate state every ``snapshot_every_s``; the one
    holding the decider lease (a PostgreSQL session advisory lock) merges them, evaluates
    and writes the decision; every replica reads that decision back and serves it.
    """

    enabled: bool = False
    replica_id: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="this replica's name in the snapshot rows; default <hostname>-<pid>",
    )
    snapshot_every_s: float = Field(
        1.0,
        gt=0,
        description="how often the local gate state is persisted and the shared "
        "decision re-read (the cadence of the leader's merge, too)",
    )
    lease_retry_s: float = Field(
        2.0, gt=0, description="how often a follower tries to take the decider lease"
    )
    lease_name: str = Field(
        "mirrorgate-decider",
        min_length=1,
        description="advisory-lock name (hashed with the rollout id): replicas sharing it "
        "and a rollout elect one decider",
    )

    def resolved_id(self) -> str:
        return self.replica_id or f"{socket.gethostname()}-{os.getpid()}"


class MirrorgateConfig(_Strict):
    server: ServerSettings = ServerSettings()
    models: ModelsSettings
    mirror: MirrorSettings = MirrorSettings()
    slices: SlicesSettings = SlicesSettings()
    features: FeaturesSettings = FeaturesSettings()
    output: OutputSettings = OutputSettings()
    storage: StorageSettings = StorageSettings()
    gates: GatesSettings = GatesSettings()
    rollout: RolloutSettings = RolloutSettings()
    replicas: ReplicasSettings = ReplicasSettings()

    def digest(self) -> str:
        """sha256 of the effective configuration (secrets excluded), for reproducibility."""
        # ``replicas`` names this process: replicas of one rollout differ there and must
        # still agree on the digest (it identifies the rollout they share).
        data = self.model_dump(mode="json", exclude={"server": {"control_token"}, "replicas": True})
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{path}: {msg}")
    return f"invalid configuration in {source}:\n  " + "\n  ".join(lines)


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    for key, raw in sorted(env.items()):
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
        if not all(path):
            raise ConfigError(f"environment variable {key}: empty path segment")
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"environment variable {key}: {part} is not a section")
            node = child
        node[path[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    data: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> MirrorgateConfig:
    """Load a config from a YAML file (or a mapping), apply env overrides, validate.

    Relative model paths are resolved against the config file's folder.
    """
    source = str(path) if path is not None else "<mapping>"
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path}: top level must be a mapping")
        raw: dict[str, Any] = loaded
    else:
        raw = json.loads(json.dumps(dict(data or {})))
    raw = _apply_env(raw, os.environ if env is None else env)
    try:
        config = MirrorgateConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from exc
    if path is not None:
        base = Path(path).resolve().parent
        for backend in (config.models.champion, config.models.candidate):
            if backend is not None and backend.path and not os.path.isabs(backend.path):
                backend.path = str(base / backend.path)
    return config
