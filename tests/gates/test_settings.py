"""Gate and rollout settings: documented defaults, strict validation, config integration."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gates.engine import advisory_level, blocking_budget, family_budgets
from gates.settings import GatesSettings, RolloutSettings, StageSettings
from gates.simulate import accuracy_check_alpha
from proxy.core.config import load_config
from proxy.core.errors import ConfigError

MINIMAL = {"models": {"champion": {"name": "c", "kind": "http", "url": "http://127.0.0.1:1"}}}


def test_default_gate_set_is_the_documented_one():
    g = GatesSettings()
    assert g.alpha == 0.05 and g.alpha_pass == 0.05 and g.task == "auto"
    assert g.metric.accuracy.margin == 0.01 and g.metric.accuracy.blocking
    assert g.tolerance.flip.max_rate == 0.10 and g.tolerance.collapse.max_rate == 0.02
    assert g.slices.keys is None and g.slices.min_samples == 300
    assert g.drift.input.psi == 0.2
    # the retrained preset: outputs may move, tolerance and output drift are evidence
    assert g.preset == "retrained" and not g.drift.output.blocking and not g.tolerance.blocking
    assert g.contract.blocking and g.metric.blocking and g.latency.blocking and g.errors.blocking
    assert g.latency.max_ratio == 1.5 and g.errors.max_excess_error_rate == 0.01
    stages = RolloutSettings().stages
    assert [s.name for s in stages] == ["shadow", "canary-5", "canary-25"]
    assert [s.canary_weight for s in stages] == [0.0, 0.05, 0.25]


def test_budget_split_over_blocking_families_sums_to_alpha():
    g = GatesSettings.model_validate({"preset": "equivalence"})  # every family blocks
    budgets = family_budgets(g)
    assert sum(budgets.values()) == pytest.approx(0.05) == pytest.approx(blocking_budget(g))
    # labelled metrics weigh 3, the contract a tenth (a broken contract shows on every
    # pair), every other family 1 (docs/gates.md, "Error budget")
    assert budgets["metric"] == pytest.approx(3 * budgets["tolerance"])
    assert budgets["contract"] == pytest.approx(budgets["tolerance"] / 10)
    assert len({round(v, 12) for k, v in budgets.items() if k not in ("metric", "contract")}) == 1
    g = GatesSettings.model_validate(
        {"preset": "equivalence", "latency": {"enabled": False}, "metric": {"alpha_weight": 1.0}}
    )
    b = family_budgets(g)
    assert b["latency"] == 0 and sum(b.values()) == pytest.approx(0.05)
    assert b["metric"] == pytest.approx(b["errors"])
    assert b["errors"] == pytest.approx(0.05 / 4.1)  # contract 0.1 + four families at 1


def test_advisory_families_take_no_share_of_the_false_abort_budget():
    # retrained (the default): tolerance and output drift cannot abort, so alpha is split
    # over contract (0.1), metric (3), latency (1) and errors (1) only
    g = GatesSettings()
    assert not g.tolerance.blocking and not g.drift.output.blocking
    b = family_budgets(g)
    blocking = ("contract", "metric", "latency", "errors")
    assert sum(b[k] for k in blocking) == pytest.approx(0.05) == pytest.approx(blocking_budget(g))
    assert b["metric"] == pytest.approx(0.05 * 3 / 5.1)
    # advisory evidence keeps its own stated level: its share among all enabled families
    assert b["tolerance"] == b["drift.output"] == pytest.approx(advisory_level(g, "tolerance"))
    assert b["tolerance"] == pytest.approx(0.05 / 7.1)
    # and within the metric family the advisory hc error rate leaves accuracy and recall
    # the family's budget: accuracy gets half of it, not a third
    assert accuracy_check_alpha(g) == pytest.approx(b["metric"] / 2)
    eq = GatesSettings.model_validate({"preset": "equivalence"})
    assert accuracy_check_alpha(eq) == pytest.approx(family_budgets(eq)["metric"] / 3)


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"metric": {"accuracy": {"margin": -0.1}}}, "margin"),
        ({"tolerance": {"flip": {"max_rate": 1.5}}}, "max_rate"),
        ({"latency": {"quantiles": [0.5, 1.0]}}, "quantiles"),
        ({"drift": {"input": {"reference": "file"}}}, "reference_path"),
        ({"drift": {"input": {"psi": None, "ks": None}}}, "effect size"),
        ({"alpha": 0.7}, "alpha"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_gate_settings_are_refused(data, where):
    with pytest.raises(ValidationError) as err:
        GatesSettings.model_validate(data)
    assert where in str(err.value)


def test_stage_validation():
    with pytest.raises(ValidationError):
        StageSettings(name="s", min_duration_s=100, max_duration_s=10)
    with pytest.raises(ValidationError):
        RolloutSettings(stages=[StageSettings(name="a"), StageSettings(name="a")])
    with pytest.raises(ValidationError):
        RolloutSettings(stages=[])


def test_gates_and_rollout_in_the_config_file_with_key_paths():
    cfg = load_config(
        data={
            **MINIMAL,
            "gates": {"metric": {"accuracy": {"margin": 0.02}}},
            "rollout": {"stages": [{"name": "only", "on_max_duration": "abort"}]},
        },
        env={"MIRRORGATE_GATES__ALPHA": "0.01"},
    )
    assert cfg.gates.metric.accuracy.margin == 0.02 and cfg.gates.alpha == 0.01
    assert cfg.rollout.stages[0].on_max_duration == "abort"
    with pytest.raises(ConfigError) as err:
        load_config(data={**MINIMAL, "gates": {"slices": {"kes": ["a"]}}}, env={})
    assert "gates.slices.kes: unknown key" in err.value.message


def test_with_slice_keys_fixes_the_keys_once():
    g = GatesSettings().with_slice_keys(["platform", "country", "platform"])
    assert g.slices.keys == ["platform", "country"]
    assert g.with_slice_keys(["other"]).slices.keys == ["platform", "country"]
