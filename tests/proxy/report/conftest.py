from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

SAMPLE = Path(__file__).with_name("sample_report.json")


@pytest.fixture(scope="session")
def _sample_loaded() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SAMPLE.read_text())
    return data


@pytest.fixture
def sample_doc(_sample_loaded: dict[str, Any]) -> dict[str, Any]:
    """A fresh deep copy of the fixture report document: tests may edit it freely."""
    return copy.deepcopy(_sample_loaded)


@pytest.fixture
def sample_path() -> Path:
    return SAMPLE
