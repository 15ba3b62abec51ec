"""Settings of the rollout lifecycle and the control plane's tokens (docs/deploy.md).

Kept apart from ``proxy/core/config.py`` so the lifecycle's knobs live in one sub-model each:
``lifecycle`` (how rollouts start, end and follow the candidate's revision) and
``control`` (who may read verdicts and who may act on them).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LifecycleSettings(_Strict):
    """A rollout judges ONE candidate revision; controllers start and close it.

    ``POST /v1/rollouts {"revision": ...}`` (Argo's ``podTemplateHashValue: Latest``,
    Flagger's pre-rollout webhook checksum) starts one; the verdict endpoints answer for
    a named revision only. Before any start the proxy judges ``revision`` (the one it was
    deployed with; ``initial`` when unset).
    """

    revision: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="the candidate revision judged before a controller starts a rollout",
    )
    on_identity_change: Literal["refuse", "new_rollout"] = Field(
        "refuse",
        description="when the candidate's identity seen on the wire changes mid-rollout: "
        "'refuse' stops judging (verdicts 409, no more pairs counted) until a rollout is "
        "started for the new revision; 'new_rollout' opens one automatically",
    )
    identity_poll_s: float = Field(
        5.0,
        ge=0,
        description="how often the candidate's V2 metadata is fetched to notice a new "
        "revision behind the same URL (0: never; in-process models are identified by "
        "their file digest)",
    )
    revision_header: str = Field(
        "X-Model-Revision",
        min_length=1,
        description="response header of the candidate's metadata naming its revision",
    )
    canary_weight_after_promote: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of live traffic the candidate serves after a promote; 0 (the "
        "default) serves the champion until the controller switches the stable service",
    )
    mirror_after_promote: bool = Field(
        False,
        description="keep mirroring to a promoted candidate (off by default: after a "
        "promote the controller replaces or scales down the canary, and a vanished "
        "candidate must cost nothing per request)",
    )
    require_revision: bool = Field(
        False,
        description="refuse verdict requests that do not name a revision (400)",
    )


class ControlSettings(_Strict):
    """Separate tokens for reading (verdict, rollout state, metrics, pinned list) and
    writing (start/close rollouts, promote/abort/pause/resume, labels, triage).
    ``server.control_token``, when set, is accepted for both (the single-token setup)."""

    read_token: SecretStr | None = Field(
        None, description="bearer token for reading: verdict, rollout state, rollouts, pinned"
    )
    write_token: SecretStr | None = Field(
        None, description="bearer token for actions: start/close, promote/abort, labels, triage"
    )
