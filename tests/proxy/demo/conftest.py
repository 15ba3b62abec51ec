"""Fixtures of the demo's tests: the shipped pool, models and their held-out correctness."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from proxy.demo import assets
from proxy.demo.offline import OfflineModel


@pytest.fixture(scope="session")
def pool() -> assets.DemoPool:
    return assets.load_pool()


@pytest.fixture(scope="session")
def manifest() -> dict[str, Any]:
    return assets.load_manifest()


@pytest.fixture(scope="session")
def models() -> dict[str, OfflineModel]:
    return {name: OfflineModel(assets.model_path(name)) for name in assets.MODEL_NAMES}


@pytest.fixture(scope="session")
def correct(pool: assets.DemoPool, models: dict[str, OfflineModel]) -> dict[str, np.ndarray]:
    """Per model: bool array over the pool, prediction == label."""
    return {name: m.predict(pool.features) == pool.labels for name, m in models.items()}
