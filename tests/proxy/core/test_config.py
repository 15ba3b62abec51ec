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
