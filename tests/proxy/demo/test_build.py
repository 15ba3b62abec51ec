"""The build script is reproducible: a rebuild gives the shipped pool and predictions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from proxy.demo import assets
from proxy.demo.offline import OfflineModel

pytest.importorskip("sklearn")  # dev dependencies of the build, not of the runtime
pytest.importorskip("onnx")

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "build_demo_models.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("build_demo_models", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rebuild_reproduces_the_shipped_assets(tmp_path: Path) -> None:
    build = _load_script()
    manifest = build.build(tmp_path)
    shipped = assets.load_pool()
    rebuilt = assets.load_pool(tmp_path)
    for field in ("features", "labels", "platform", "image"):
        np.testing.assert_array_equal(getattr(rebuilt, field), getattr(shipped, field))
    for name in assets.MODEL_NAMES:
        new = OfflineModel(assets.model_path(name, tmp_path)).predict_proba(shipped.features)
        old = OfflineModel(assets.model_path(name)).predict_proba(shipped.features)
        np.testing.assert_array_equal(new.argmax(axis=1), old.argmax(axis=1))
        np.testing.assert_allclose(new, old, atol=1e-4)
    shipped_manifest = assets.load_manifest()
    for name in assets.MODEL_NAMES:
        assert (
            manifest["models"][name]["per_platform"]
            == shipped_manifest["models"][name]["per_platform"]
        )
    # The report the script prints is the manifest's numbers.
    table = build.report(manifest)
    mobile = manifest["models"]["candidate_regressed"]["per_platform"]["mobile"]
    assert f"({mobile['correct']}/{mobile['n']})" in table
    assert json.loads((tmp_path / assets.MANIFEST_FILE).read_text()) == manifest
