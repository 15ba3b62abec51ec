"""create_backend: the runtime by kind, wrapped for batching when settings ask for it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

from proxy.backends.batching import BatchingBackend
from proxy.backends.factory import create_backend
from proxy.backends.onnx import OnnxBackend
from proxy.core.config import load_config
from tests.proxy import models


async def test_settings_from_a_config_file_build_the_runtimes(tmp_path: Path) -> None:
    weights = models.build_onnx_classifier(tmp_path / "champion.onnx", 4, 3, seed=31)
    (tmp_path / "mirrorgate.yaml").write_text(
        "models:\n"
        "  champion: {name: champ, kind: onnx, path: champion.onnx, threads: 1}\n"
        "  candidate:\n"
        "    name: cand\n"
        "    kind: torch\n"
        "    factory: tests.proxy.torch_models:make_classifier\n"
        "    batching: {max_batch_size: 16, max_batch_delay_ms: 1}\n"
    )
    config = load_config(tmp_path / "mirrorgate.yaml", env={})
    assert config.models.candidate is not None
    registry = CollectorRegistry()
    champion = await create_backend(config.models.champion, registry)
    candidate = await create_backend(config.models.candidate, registry)
    try:
        assert isinstance(champion, OnnxBackend)
        assert isinstance(candidate, BatchingBackend)
        assert candidate.identity.kind == "torch"
        x = weights.sample(3)
        out = await champion.infer({"x": x})
        np.testing.assert_allclose(out["probs"], weights.probs(x), rtol=1e-5, atol=1e-6)
        assert sorted(await candidate.infer({"x": x})) == ["label", "probs"]
        text = generate_latest(registry).decode()
        assert 'mirrorgate_batcher_batch_size_count{model="cand"} 1.0' in text
    finally:
        await champion.aclose()
        await candidate.aclose()
