"""Settings classes of data-plane parts that ``proxy.core.config`` nests.

They live here, beside the other settings, so that ``core`` imports nothing above it:
the breaker and the connection limits they configure are data plane
(``proxy.dataplane.breaker``, ``proxy.dataplane.limits``), which import them from here.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CircuitSettings(BaseModel):
    """``mirror.circuit``: the candidate's circuit breaker."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="open the circuit after consecutive candidate failures")
    failure_threshold: int = Field(5, ge=1, description="consecutive failures that open it")
    open_s: float = Field(5.0, gt=0, description="first open period before a probe")
    max_open_s: float = Field(60.0, gt=0, description="cap of the doubling open period")
    half_open_probes: int = Field(1, ge=1, description="calls let through when half-open")


class ServerLimits(BaseModel):
    """``server.limits``."""

    model_config = ConfigDict(extra="forbid")

    keepalive_timeout_s: float = Field(
        15.0, gt=0, description="idle connection, or an incomplete request head, closed after"
    )
    body_timeout_s: float = Field(30.0, gt=0, description="the whole body must arrive within")
    max_connections: int | None = Field(
        None, ge=1, description="open connections before shedding (default: half the fd limit)"
    )
    log_lines_per_minute: int = Field(
        20, ge=1, description="per logger and message, for loggers clients can trigger"
    )
