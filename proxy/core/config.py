"""The one configuration file: YAML validated by pydantic v2.

Unknown keys and bad values are errors naming the key's path and its source. Any field
can be overridden by an environment variable ``MIRRORGATE_<SECTION>__<FIELD>[__<SUB>...]``
(double underscore between levels, pydantic-settings' nesting); values are strings as
given, converted by pydantic where a field is a number, boolean or list (JSON). Loading
lives in ``proxy.core.settings_load``; this module holds the field definitions.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, SecretStr, model_validator

from gates.settings import GatesSettings, RolloutSettings
from proxy.core.lifecycle_settings import ControlSettings, LifecycleSettings
from proxy.core.runtime_settings import CircuitSettings, ServerLimits
from storage.settings import StorageSettings

ENV_PREFIX = "MIRRORGATE_"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchingSettings(_Strict):
    """Dynamic micro-batching of in-process backends (Triton's dynamic batcher)."""

    max_batch_size: int = Field(1, ge=1, description="1 disables batching")
    max_batch_delay_ms: float = Field(2.0, ge=0)


class UpstreamSettings(_Strict):
    """How an ``http`` backend talks to its V2 server (docs/proxy.md)."""

    binary: Literal["auto", "always", "never"] = Field(
        "auto",
        description="binary tensor extension for rebuilt requests: auto follows the "
        "server metadata's extensions (GET /v2), never sends JSON (MLServer)",
    )
    ca_file: str | None = Field(None, description="PEM bundle to verify an https upstream")
    cert_file: str | None = Field(None, description="client certificate (mTLS), PEM")
    key_file: str | None = Field(None, description="client certificate's key, PEM")
    forward_headers: list[str] | None = Field(
        None,
        description="client request headers sent on to this upstream ('*': every "
        "end-to-end header); default: every one to the champion, tracing headers "
        "(traceparent, tracestate, baggage) to the candidate",
    )

    @model_validator(mode="after")
    def _check_tls(self) -> UpstreamSettings:
        if self.key_file and not self.cert_file:
            raise ValueError("'key_file' needs 'cert_file'")
        return self


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
    upstream: UpstreamSettings = UpstreamSettings()

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
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="live-path processes sharing the port (SO_REUSEPORT); serve only",
    )
    cpus: list[NonNegativeInt] | None = Field(
        None,
        min_length=1,
        description="CPUs the live process(es) run on (Linux affinity; null: inherited);"
        " with shadow.worker_cpus, the shadow worker off the live path's cores"
        " (docs/shadow-worker.md)",
    )
    live_path: Literal["auto", "aiohttp", "bytes"] = Field(
        "auto",
        description="how serve answers live infer requests: bytes (a byte-level listener "
        "forwarding to a remote champion, everything else handed to the aiohttp app), "
        "aiohttp (the aiohttp app for everything), auto (bytes when the champion is kind "
        "http); serve only: docs/proxy.md",
    )
    event_loop: Literal["asyncio", "uvloop"] = Field(
        "asyncio",
        description="serve's event loop (live processes and shadow worker); uvloop needs "
        "mirrorgate[uvloop]: better c=1 p50, worse p99 and c=32 here: docs/benchmarks.md",
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


class ShadowSettings(_Strict):
    """Where ``mirrorgate serve`` does the shadow work (docs/shadow-worker.md).

    ``auto`` (the default): a worker process when the candidate is a remote (``http``)
    model: the candidate call, the pair's decoding, recording and the gates run in a
    separate worker process fed through a bounded hand-off, and the live processes only
    forward, answer and hand off, so none of it shares the live loop or its GIL (issue 11
    item 5). The control plane and /metrics stay reachable where they were: through the
    data port, or on ``server.control_port``'s listener in the serving process, which
    forwards /v1 to the worker and merges its metrics. In-process candidates (ONNX/Torch)
    stay in one process under ``auto``, because the live process must hold the candidate
    anyway to serve canary traffic (the worker would load a second copy of the model),
    and the latency gate would compare a champion run in one process with a candidate run
    in another under two processes' CPU contention. ``true``: the worker process whatever
    the candidate's kind. ``false``: all in the serving process (the in-process
    dispatcher; what ``create_app`` alone always does).
    """

    process: bool | Literal["auto"] = Field(
        "auto",
        description="shadow work in a worker process: auto (remote candidates), true, false",
    )
    handoff_max_jobs: int = Field(
        4096, ge=1, description="jobs handed off and not yet taken in by the worker"
    )
    handoff_max_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="bytes handed off and not yet taken in"
    )
    restart: bool = Field(True, description="restart a shadow worker that died")
    # Off by default: at a lower CPU priority the scheduler gives a core to the live process
    # first (measured on 2 cores, docs/benchmarks.md: more throughput at c=32, 0 drops).
    # The candidate's latency is now the kernel's receive stamp (rawhttp), so a late READ
    # no longer biases the latency gates; but a starved worker also SENDS in bursts that
    # queue at the candidate's upstream, which then really answers slower at the tail
    # (docs/shadow-worker.md, "CPU priority"). Until those sends are paced, the default
    # keeps the gates' evidence honest over the live path's cost.
    worker_nice: int = Field(
        0,
        ge=0,
        le=19,
        description=(
            "nice increment of the shadow worker process (0: serve's priority); on a"
            " saturated host raising it can inflate the candidate's tail latency the gates"
            " compare (docs/shadow-worker.md)"
        ),
    )
    worker_cpus: list[NonNegativeInt] | None = Field(
        None,
        min_length=1,
        description="CPUs the shadow worker process runs on (Linux affinity; null: the"
        " set serve started with, whatever server.cpus says)",
    )


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
    lifecycle: LifecycleSettings = LifecycleSettings()
    control: ControlSettings = ControlSettings()
    shadow: ShadowSettings = ShadowSettings()

    @model_validator(mode="after")
    def _check_latency_censoring(self) -> MirrorgateConfig:
        # One rule between two settings that stay separate: the gates' censoring value
        # is part of the experiment (the digest), the deadlines are tuning knobs.
        censor = self.gates.latency.timeout_ms
        if censor is None:
            return self
        deadlines = {"models.champion.timeout_ms": self.models.champion.timeout_ms}
        if self.models.candidate is not None:
            deadlines["models.candidate.timeout_ms"] = self.models.candidate.timeout_ms
        longest = max(deadlines, key=lambda k: deadlines[k])
        if censor < deadlines[longest]:
            raise ValueError(
                f"gates.latency.timeout_ms ({censor:g}) is below {longest} "
                f"({deadlines[longest]:g}): a call may succeed in up to {deadlines[longest]:g} "
                "ms, and a failed one counted as slow at the lower value would look faster "
                f"than that; set gates.latency.timeout_ms to at least {deadlines[longest]:g} "
                "(the longest deadline a paired call runs under), or leave it unset"
            )
        return self

    def digest(self) -> str:
        """sha256 of what defines the experiment: the rollout's identity.

        Only the models (name, kind, upstream model name, factory), the gates, the plan
        and what the gates read (task, output, slices, features, served model name).
        Never secrets (tokens, the storage URL's password), addresses (host, port,
        backend URLs and paths: the models' own digests identify them) or tuning knobs
        (mirror, storage, timeouts, threads, batching, replicas): a password rotation, a
        port change or a ``max_in_flight`` change must neither restart the evidence nor
        split the replicas of a rolling update into different rollouts.
        """
        models = {
            role: None
            if backend is None
            else backend.model_dump(mode="json", include={"name", "kind", "model", "factory"})
            for role, backend in (
                ("champion", self.models.champion),
                ("candidate", self.models.candidate),
            )
        }
        data = {
            "models": models,
            "gates": self.gates.model_dump(mode="json"),
            "rollout": self.rollout.model_dump(mode="json"),
            "slices": self.slices.model_dump(mode="json"),
            "features": self.features.model_dump(mode="json"),
            "output": self.output.model_dump(mode="json"),
            "model_name": self.server.model_name,
        }
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    data: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> MirrorgateConfig:
    """Load a config from a YAML file (or a mapping), apply env overrides, validate.

    Sources and error wording: ``proxy.core.settings_load``. Relative model paths are
    resolved against the config file's folder.
    """
    from proxy.core.settings_load import load_settings

    if data is not None:
        data = json.loads(json.dumps(dict(data)))
    config: MirrorgateConfig = load_settings(MirrorgateConfig, path, data=data, env=env)
    if path is not None:
        base = Path(path).resolve().parent
        for backend in (config.models.champion, config.models.candidate):
            if backend is not None and backend.path and not os.path.isabs(backend.path):
                backend.path = str(base / backend.path)
    return config
