"""Configuration through pydantic-settings: sources named in errors, secrets as given,
misspelt variables caught, model files and URLs checked before any side effect."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.cli.preflight import problems
from proxy.core.config import load_config
from proxy.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]


def _minimal() -> dict:
    return {"models": {"champion": {"name": "c", "kind": "http", "url": "http://x"}}}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("token", ["123456", "yes", "*k9Zp", "null", "true", "1.5e3", "[x]"])
def test_secret_from_env_is_the_exact_string(token):
    env = {"MIRRORGATE_SERVER__CONTROL_TOKEN": token}
    config = load_config(data=_minimal(), env=env)
    assert config.server.control_token is not None
    assert config.server.control_token.get_secret_value() == token


def test_bad_env_value_names_the_variable_not_the_file(tmp_path):
    path = _write(tmp_path, _minimal())
    with pytest.raises(ConfigError) as err:
        load_config(path, env={"MIRRORGATE_MIRROR__SAMPLE_RATE": "abc"})
    message = err.value.message
    assert "mirror.sample_rate" in message
    assert "environment variable MIRRORGATE_MIRROR__SAMPLE_RATE" in message
    assert "ok.yaml" not in message


def test_bad_file_value_names_the_file_and_key(tmp_path):
    data = _minimal()
    data["mirror"] = {"sample_rate": "abc"}
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert f"[{path}, key mirror.sample_rate]" in err.value.message


def test_env_values_are_converted_by_the_field_type():
    env = {
        "MIRRORGATE_SERVER__PORT": "9000",
        "MIRRORGATE_MIRROR__SHADOW_AFTER_ABORT": "yes",
        "MIRRORGATE_SLICES__HEADERS": '["platform", "region"]',
    }
    config = load_config(data=_minimal(), env=env)
    assert config.server.port == 9000
    assert config.mirror.shadow_after_abort is True
    assert config.slices.headers == ["platform", "region"]


def test_env_overrides_the_file(tmp_path):
    data = _minimal()
    data["server"] = {"port": 1234}
    path = _write(tmp_path, data)
    assert load_config(path, env={"MIRRORGATE_SERVER__PORT": "4321"}).server.port == 4321


def test_single_underscore_variable_is_an_error_with_the_right_name():
    with pytest.raises(ConfigError) as err:
        load_config(data=_minimal(), env={"MIRRORGATE_MIRROR_SAMPLE_RATE": "0.5"})
    message = err.value.message
    assert "MIRRORGATE_MIRROR_SAMPLE_RATE" in message
    assert "did you mean MIRRORGATE_MIRROR__SAMPLE_RATE?" in message


def test_unknown_section_and_key_suggest_the_closest():
    with pytest.raises(ConfigError) as err:
        load_config(data=_minimal(), env={"MIRRORGATE_SERVR__PORT": "1"})
    assert "did you mean section 'server'" in err.value.message
    with pytest.raises(ConfigError) as err:
        load_config(data=_minimal(), env={"MIRRORGATE_MIRROR__SAMPLERATE": "1"})
    assert "did you mean 'mirror.sample_rate'" in err.value.message
    assert "environment variable MIRRORGATE_MIRROR__SAMPLERATE" in err.value.message


def test_other_mirrorgate_variables_are_not_overrides():
    env = {
        "MIRRORGATE_CONFIG": "x.yaml",
        "MIRRORGATE_REQUIRE_SERVICES": "1",
        "MIRRORGATE_HEALTHCHECK_URL": "http://h",
        "MIRRORGATE_TORCH": "none",
    }
    assert load_config(data=_minimal(), env=env).server.port == 8080


def test_bad_json_list_names_the_variable():
    with pytest.raises(ConfigError) as err:
        load_config(data=_minimal(), env={"MIRRORGATE_SLICES__HEADERS": "[a"})
    assert "MIRRORGATE_SLICES__HEADERS" in err.value.message


def test_preflight_names_field_paths(tmp_path):
    data = {
        "models": {
            "champion": {"name": "a", "kind": "http", "url": "localhost:8000"},
            "candidate": {"name": "b", "kind": "onnx", "path": "missing.onnx"},
        },
        "storage": {"url": "mysql://u@h/db"},
    }
    found = problems(load_config(_write(tmp_path, data), env={}))
    assert any(p.startswith("models.champion.url: not an absolute http(s) URL") for p in found)
    assert any(p.startswith("models.candidate.path: no such file:") for p in found)
    assert any(p.startswith("storage.url: storage.url ") and "only sqlite" in p for p in found)


def test_preflight_refuses_uvloop_where_it_is_not_installed(tmp_path, monkeypatch):
    pytest.importorskip("uvloop")  # the dev extra installs it
    config = load_config(
        _write(tmp_path, {**_minimal(), "server": {"event_loop": "uvloop"}}), env={}
    )
    assert not any(p.startswith("server.event_loop") for p in problems(config))
    # uvloop is installed where the tests run: its absence is simulated at the one call
    # preflight makes to look for it (before, serve silently ran asyncio instead)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a)
    )
    assert (
        "server.event_loop: uvloop is not installed: pip install 'mirrorgate[uvloop]'"
        in problems(config)
    )


def test_serve_with_a_missing_model_fails_before_migration_or_listening(tmp_path):
    data = {
        "models": {
            "champion": {"name": "a", "kind": "http", "url": "http://127.0.0.1:9"},
            "candidate": {"name": "b", "kind": "onnx", "path": "missing.onnx"},
        },
        "storage": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
    }
    path = _write(tmp_path, data)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORGATE_")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert "models.candidate.path: no such file" in result.stderr
    assert "listening" not in result.stdout
    assert not (tmp_path / "db.sqlite").exists()


def test_config_validate_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORGATE_")}
    env["PYTHONPATH"] = str(ROOT)
    good = _write(tmp_path, _minimal())
    cmd = [sys.executable, "-m", "proxy", "config", "validate", str(good)]
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "valid" in ok.stdout
    env["MIRRORGATE_MIRROR_SAMPLE_RATE"] = "0.5"
    bad = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2
    assert "MIRRORGATE_MIRROR__SAMPLE_RATE" in bad.stderr
