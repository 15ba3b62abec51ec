"""Fixtures of the deployment-artefact tests (helpers live in helpers.py)."""

from __future__ import annotations

import pytest

from tests.deploy.helpers import require_tool


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool")
