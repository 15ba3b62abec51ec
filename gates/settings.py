"""Typed settings of the gates and the rollout plan (pydantic models, validation only).

PLACEHOLDER written with the skeleton; the gates work replaces the bodies, keeping the
two class names that ``proxy.config`` imports.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class GatesSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RolloutSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
