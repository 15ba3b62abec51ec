"""The config reference is generated from the model and describes every field."""

import subprocess
import sys
from pathlib import Path

import yaml

from proxy.cli.config_reference import defaults, markdown, walk
from proxy.core.config import MirrorgateConfig

ROOT = Path(__file__).resolve().parents[3]


def test_every_field_has_a_description():
    missing = [doc.path for doc in walk(MirrorgateConfig) if not doc.description.strip()]
    assert missing == [], f"describe these fields (Field description or DESCRIPTIONS): {missing}"


def test_committed_reference_is_the_generated_one():
    committed = (ROOT / "docs" / "config-reference.md").read_text()
    assert committed == markdown(MirrorgateConfig), (
        "regenerate: mirrorgate config reference > docs/config-reference.md"
    )


def test_reference_lists_every_field_with_its_variable():
    text = markdown(MirrorgateConfig)
    assert "`MIRRORGATE_MIRROR__SAMPLE_RATE`" in text
    assert "`rollout.stages[].name`" in text


def test_defaults_are_loadable_once_required_keys_are_given():
    data = defaults(MirrorgateConfig)
    data["models"] = {"champion": {"name": "c", "kind": "http", "url": "http://x"}}
    config = MirrorgateConfig.model_validate(data)
    assert config.model_dump(mode="json", exclude={"models"}) == MirrorgateConfig.model_validate(
        {"models": data["models"]}
    ).model_dump(mode="json", exclude={"models"})


def test_schema_and_defaults_commands_print_parseable_output():
    schema = subprocess.run(
        [sys.executable, "-m", "proxy", "config", "schema"], capture_output=True, text=True
    )
    assert schema.returncode == 0
    assert '"MirrorgateConfig"' in schema.stdout or '"title": "MirrorgateConfig"' in schema.stdout
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "config", "defaults"], capture_output=True, text=True
    )
    assert yaml.safe_load(out.stdout)["mirror"]["sample_rate"] == 1.0
