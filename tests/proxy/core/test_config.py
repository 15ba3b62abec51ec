from pathlib import Path

import pytest

from proxy.core.config import load_config
from proxy.core.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "mirrorgate.yaml"


def _minimal() -> dict:
    return {"models": {"champion": {"name": "c", "kind": "http", "url": "http://x"}}}


def test_example_config_validates():
    config = load_config(EXAMPLE, env={})
    assert config.models.champion.kind in {"onnx", "torch", "http"}
    assert Path(config.models.champion.path or "").is_absolute() or config.models.champion.url


def test_unknown_key_names_its_path():
    data = _minimal()
    data["mirror"] = {"mode": "shadow", "sampel_rate": 0.5}
    with pytest.raises(ConfigError) as err:
        load_config(data=data, env={})
    assert "mirror.sampel_rate: unknown key" in err.value.message


def test_bad_value_names_its_path():
    data = _minimal()
    data["mirror"] = {"canary_weight": 1.5}
    with pytest.raises(ConfigError) as err:
        load_config(data=data, env={})
    assert "mirror.canary_weight" in err.value.message


def test_backend_needs_its_source():
    with pytest.raises(ConfigError) as err:
        load_config(data={"models": {"champion": {"name": "c", "kind": "onnx"}}}, env={})
    assert "models.champion" in err.value.message and "path" in err.value.message


def test_env_overrides_nested_fields_with_yaml_scalars():
    env = {
        "MIRRORGATE_SERVER__PORT": "9123",
        "MIRRORGATE_MIRROR__MODE": "canary",
        "MIRRORGATE_SERVER__CONTROL_TOKEN": "s3cret",
        "MIRRORGATE_CONFIG": "ignored: no double underscore",
    }
    config = load_config(data=_minimal(), env=env)
    assert config.server.port == 9123
    assert config.mirror.mode == "canary"
    assert config.server.control_token is not None
    assert config.server.control_token.get_secret_value() == "s3cret"


def test_env_override_of_unknown_key_is_an_error():
    with pytest.raises(ConfigError) as err:
        load_config(data=_minimal(), env={"MIRRORGATE_SERVER__PROT": "1"})
    assert "server.prot: unknown key" in err.value.message


def test_digest_excludes_secrets_and_tracks_changes():
    a = load_config(data=_minimal(), env={"MIRRORGATE_SERVER__CONTROL_TOKEN": "a"})
    b = load_config(data=_minimal(), env={"MIRRORGATE_SERVER__CONTROL_TOKEN": "b"})
    c = load_config(data=_minimal(), env={"MIRRORGATE_GATES__ALPHA": "0.01"})
    assert a.digest() == b.digest() != c.digest()


def test_digest_ignores_addresses_passwords_and_tuning():
    """The digest identifies the experiment (models, gates, plan): a password rotation,
    another port or a tuning knob must not open a new rollout (issue 15/17)."""
    base = load_config(data=_minimal())
    for env in (
        {"MIRRORGATE_SERVER__PORT": "1"},
        {"MIRRORGATE_SERVER__HOST": "0.0.0.0"},
        {"MIRRORGATE_STORAGE__URL": "postgresql+psycopg://u:secret1@db:5432/m"},
        {"MIRRORGATE_STORAGE__URL": "postgresql+psycopg://u:secret2@db:5432/m"},
        {"MIRRORGATE_MIRROR__MAX_IN_FLIGHT": "7"},
        {"MIRRORGATE_MIRROR__SAMPLE_RATE": "0.5"},
        {"MIRRORGATE_CONTROL__READ_TOKEN": "r"},
        {"MIRRORGATE_LIFECYCLE__REVISION": "abc"},
    ):
        assert load_config(data=_minimal(), env=env).digest() == base.digest(), env
    plan = {"MIRRORGATE_ROLLOUT__EVALUATE_EVERY_PAIRS": "5"}
    assert load_config(data=_minimal(), env=plan).digest() != base.digest()


def _with_latency_timeout(censor: float | None, candidate_ms: float = 3000.0) -> dict:
    data = _minimal()
    data["models"]["candidate"] = {
        "name": "n",
        "kind": "http",
        "url": "http://y",
        "timeout_ms": candidate_ms,
    }
    if censor is not None:
        data["gates"] = {"latency": {"timeout_ms": censor}}
    return data


def test_latency_censoring_below_a_models_deadline_is_refused_at_load():
    """The latency gate counts a failed call as gates.latency.timeout_ms slow; below the
    longest deadline a call may succeed under, a failure would look faster than a slow
    success: refused, naming both settings and the value that would do."""
    with pytest.raises(ConfigError) as err:
        load_config(data=_with_latency_timeout(1000.0), env={})
    message = err.value.message
    assert "gates.latency.timeout_ms (1000)" in message
    assert "models.candidate.timeout_ms (3000)" in message and "at least 3000" in message
    # Equal to the longest deadline, above it, or unset: accepted.
    for censor in (3000.0, 5000.0, None):
        config = load_config(data=_with_latency_timeout(censor), env={})
        assert config.gates.latency.timeout_ms == censor
    # The environment can fix it like any key.
    env = {"MIRRORGATE_MODELS__CANDIDATE__TIMEOUT_MS": "800"}
    assert load_config(data=_with_latency_timeout(1000.0), env=env).gates.latency.timeout_ms == 1000
