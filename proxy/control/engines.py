"""The one place that builds a rollout's decision engine from the configuration.

A single proxy (``proxy.control.rollout.RolloutService``), the replicas' decider
(``proxy.control.replicas.merged_engine``) and every engine restored from a snapshot must use the
same gate settings: the slice keys the proxy knows up front split the error budget
(``GatesSettings.with_slice_keys``), so an engine built from the raw ``config.gates``
spends each slice cell's alpha over ``slices.max_keys`` instead and decides later
(issue 17). Whatever ``gates/`` does with these settings, every path goes through here.
"""

from __future__ import annotations

from typing import Any

from gates.engine import RolloutEngine
from gates.settings import GatesSettings, Task
from proxy.core.config import MirrorgateConfig


def gate_settings(config: MirrorgateConfig) -> GatesSettings:
    """The gate settings every engine of this configuration uses."""
    slices = config.slices
    return config.gates.with_slice_keys([*slices.headers, *slices.parameters, *slices.rules])


def gate_task(config: MirrorgateConfig) -> Task:
    """The gates' own task setting wins; "auto" follows the proxy's declared output task."""
    if config.gates.task != "auto":
        return config.gates.task
    return config.output.task


def new_engine(config: MirrorgateConfig, *, start_ts: float) -> RolloutEngine:
    """A fresh engine for a rollout starting at ``start_ts``."""
    return RolloutEngine(
        gate_settings(config), config.rollout, task=gate_task(config), start_ts=start_ts
    )


def engine_from_state(config: MirrorgateConfig, state: dict[str, Any]) -> RolloutEngine:
    """An engine restored from ``RolloutEngine.state_dict()`` (a snapshot, the decider's)."""
    return RolloutEngine.from_state(state, gate_settings(config), config.rollout)
