"""Gate presets on the demo's real models: the default (retrained) promotes the better
candidate and still aborts the regressed one; deploy/'s shipped configuration does the
same; the equivalence preset is the one that holds a retrained model to its outputs.

Replay of the pairs the shipped ONNX models produce on the demo's traffic (the records
the proxy would write, proxy/demo/recorded.py), through the real engine.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from gates.records import PairRecord
from gates.replay import replay
from gates.settings import GatesSettings, RolloutSettings
from proxy.cli.commands.demo import DEMO_GATES, DEMO_PLAN, MAX_REQUESTS
from proxy.core.config import MirrorgateConfig
from proxy.demo import assets
from proxy.demo.offline import OfflineModel
from proxy.demo.recorded import DEFAULT_START_TS, iter_pair_records
from proxy.demo.traffic import Traffic, scenario

ROOT = Path(__file__).resolve().parents[3]
Labels = list[tuple[str, object, float]]


def _traffic(
    pool: assets.DemoPool, models: dict[str, OfflineModel], candidate: str
) -> tuple[list[PairRecord], Labels]:
    # the demo's own request budget for the fast scenario (proxy/cli/commands/demo.py)
    traffic = Traffic(dataclasses.replace(scenario("fast"), requests=MAX_REQUESTS["fast"]), pool)
    records = list(iter_pair_records(traffic, models[assets.CHAMPION], models[candidate]))
    labels = [(lab.id, lab.label, DEFAULT_START_TS + lab.t) for lab in traffic.labels()]
    return records, labels


@pytest.fixture(scope="module")
def good(pool: assets.DemoPool, models: dict[str, OfflineModel]) -> tuple[list, Labels]:
    return _traffic(pool, models, assets.CANDIDATE_GOOD)


@pytest.fixture(scope="module")
def regressed(pool: assets.DemoPool, models: dict[str, OfflineModel]) -> tuple[list, Labels]:
    return _traffic(pool, models, assets.CANDIDATE_REGRESSED)


DEMO_ROLLOUT = RolloutSettings.model_validate(DEMO_PLAN)
# The recorded latencies are in-process wall times on a shared, loaded 2-core machine:
# scheduling noise, not the models (the demo makes latency evidence for the same reason,
# docs/demo.md). Every other family keeps the preset's default.
NO_LATENCY = {"latency": {"blocking": False}}


def without_latency(gates: GatesSettings) -> GatesSettings:
    return gates.model_copy(
        update={"latency": gates.latency.model_copy(update=NO_LATENCY["latency"])}
    )


def test_default_preset_promotes_the_better_candidate(good: tuple[list, Labels]) -> None:
    gates = GatesSettings.model_validate(NO_LATENCY)
    assert gates.preset == "retrained" and not gates.tolerance.blocking
    result = replay(*good, gates=gates, plan=DEMO_ROLLOUT)
    assert result.evaluation.verdict == "promote", result.evaluation.reason
    # the contract held on every pair and decided nothing against the candidate
    contract = next(g for g in result.evaluation.gates if g.name == "contract")
    assert contract.details["violations"] == 0


def test_default_preset_still_aborts_the_regressed_candidate(
    regressed: tuple[list, Labels],
) -> None:
    result = replay(*regressed, gates=GatesSettings.model_validate(NO_LATENCY), plan=DEMO_ROLLOUT)
    assert result.evaluation.verdict == "abort"
    assert result.evaluation.reason.split(": ", 1)[1].startswith("metric.")


def test_equivalence_preset_holds_a_retrained_model_to_its_outputs(
    good: tuple[list, Labels],
) -> None:
    """What the issue saw with the old defaults: the better model aborted on ``shift``."""
    gates = GatesSettings.model_validate({"preset": "equivalence", **NO_LATENCY})
    result = replay(*good, gates=gates, plan=DEMO_ROLLOUT)
    assert result.evaluation.verdict == "abort"
    assert "tolerance." in result.evaluation.reason.split(" FAIL")[0]


def test_demo_config_names_its_preset() -> None:
    assert DEMO_GATES["preset"] == "retrained"
    assert GatesSettings.model_validate(DEMO_GATES).preset == "retrained"


@pytest.mark.parametrize(
    "path",
    [
        "deploy/kubernetes/configmap.yaml",
        "deploy/docker/mirrorgate.yaml",
        "examples/mirrorgate.yaml",
    ],
)
def test_every_shipped_config_sets_its_preset_explicitly(path: str) -> None:
    raw = yaml.safe_load((ROOT / path).read_text())
    if "data" in raw:  # the ConfigMap carries the file as a string
        raw = yaml.safe_load(raw["data"]["mirrorgate.yaml"])
    assert raw["gates"]["preset"] == "retrained"


def test_deploy_config_promotes_the_better_candidate(good: tuple[list, Labels]) -> None:
    """The ConfigMap's gates and (default) rollout plan. Its stages last at least 300 s,
    so the same recorded traffic is replayed as if it arrived 1000x slower (~2 h)."""
    raw = yaml.safe_load((ROOT / "deploy/kubernetes/configmap.yaml").read_text())
    config = MirrorgateConfig.model_validate(yaml.safe_load(raw["data"]["mirrorgate.yaml"]))
    records, labels = good

    def slow(ts: float) -> float:
        return DEFAULT_START_TS + (ts - DEFAULT_START_TS) * 1000.0

    records = [dataclasses.replace(r, ts=slow(r.ts)) for r in records]
    labels = [(i, y, slow(t)) for i, y, t in labels]
    assert config.gates.preset == "retrained"
    result = replay(records, labels, gates=without_latency(config.gates), plan=config.rollout)
    assert result.evaluation.verdict == "promote", result.evaluation.reason
    assert len(result.decisions) == len(config.rollout.stages)  # advanced through each stage
