"""Fixtures for the backend tests: the contract suite's backends and a counting wrapper.

The contract suite (test_contract.py) runs the same assertions over every entry of
``CONTRACT_BUILDERS``. To put another backend under contract (e.g. ``http`` against a
mirrorgate or Triton upstream serving ``contract_files.onnx``), add one builder here.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from proxy.core.config import BackendSettings, BatchingSettings
from proxy.protocol.base import Backend, ModelIdentity, ModelMetadata
from tests.proxy import models


@dataclass(frozen=True)
class ContractFiles:
    """Model files built once per session; every file is the same classifier function."""

    onnx: Path
    onnx_weights: models.ClassifierWeights
    torchscript: Path
    torchscript_weights: models.ClassifierWeights
    export: Path
    export_weights: models.ClassifierWeights


@dataclass
class ContractCase:
    """A backend serving a classifier with input ``x``, outputs ``probs`` and ``label``."""

    backend: Backend
    weights: models.ClassifierWeights  # the numpy oracle
    kind: str  # expected identity kind
    digest: str | None  # expected identity digest (None: not derivable from a file)


ContractBuilder = Callable[[ContractFiles], Awaitable[ContractCase]]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _onnx(files: ContractFiles, batching: BatchingSettings | None = None) -> ContractCase:
    from proxy.backends.onnx import OnnxBackend

    settings = BackendSettings(name="contract-onnx", kind="onnx", path=str(files.onnx))
    backend: Backend = await OnnxBackend.create(settings)
    if batching is not None:
        from proxy.backends.batching import BatchingBackend

        backend = BatchingBackend(backend, batching)
    return ContractCase(backend, files.onnx_weights, "onnx", _sha256(files.onnx))


async def _torchscript(files: ContractFiles) -> ContractCase:
    from proxy.backends.torch import TorchBackend

    settings = BackendSettings(name="contract-ts", kind="torch", path=str(files.torchscript))
    backend = await TorchBackend.create(settings)
    return ContractCase(backend, files.torchscript_weights, "torch", _sha256(files.torchscript))


async def _torch_export(files: ContractFiles) -> ContractCase:
    from proxy.backends.torch import TorchBackend

    settings = BackendSettings(name="contract-export", kind="torch", path=str(files.export))
    backend = await TorchBackend.create(settings)
    return ContractCase(backend, files.export_weights, "torch", _sha256(files.export))


async def _torch_factory(files: ContractFiles) -> ContractCase:
    from proxy.backends.torch import TorchBackend
    from tests.proxy import torch_models as tm

    settings = BackendSettings(
        name="contract-factory", kind="torch", factory="tests.proxy.torch_models:make_classifier"
    )
    backend = await TorchBackend.create(settings)
    weights = models.classifier_weights(tm.FACTORY_FEATURES, tm.FACTORY_CLASSES, tm.FACTORY_SEED)
    return ContractCase(backend, weights, "torch", None)


async def _onnx_batched(files: ContractFiles) -> ContractCase:
    return await _onnx(files, BatchingSettings(max_batch_size=8, max_batch_delay_ms=1.0))


CONTRACT_BUILDERS: dict[str, ContractBuilder] = {
    "onnx": _onnx,
    "onnx-batched": _onnx_batched,
    "torchscript": _torchscript,
    "torch-export": _torch_export,
    "torch-factory": _torch_factory,
}


@pytest.fixture(scope="session")
def contract_files(tmp_path_factory: pytest.TempPathFactory) -> ContractFiles:
    root = tmp_path_factory.mktemp("contract-models")
    onnx_path = root / "classifier.onnx"
    ts_path = root / "classifier.pt"
    export_path = root / "classifier.pt2"
    return ContractFiles(
        onnx=onnx_path,
        onnx_weights=models.build_onnx_classifier(onnx_path, 4, 3, seed=1),
        torchscript=ts_path,
        torchscript_weights=models.build_torchscript_classifier(ts_path, 4, 3, seed=2),
        export=export_path,
        export_weights=models.build_torch_export_classifier(export_path, 4, 3, seed=3),
    )


@pytest.fixture(params=sorted(CONTRACT_BUILDERS))
async def contract(
    request: pytest.FixtureRequest, contract_files: ContractFiles
) -> AsyncIterator[ContractCase]:
    case = await CONTRACT_BUILDERS[request.param](contract_files)
    try:
        yield case
    finally:
        await case.backend.aclose()


@dataclass
class CountingBackend:
    """A real backend behind a recorder: every call's input shapes, in call order.

    With ``hold`` set, each call waits until the test sets ``release`` (an asyncio.Event)
    after it has been recorded, so a test can pile requests up behind a busy model."""

    inner: Backend
    hold: bool = False
    calls: list[dict[str, tuple[int, ...]]] = field(default_factory=list)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def metadata(self) -> ModelMetadata:
        return self.inner.metadata

    @property
    def identity(self) -> ModelIdentity:
        return self.inner.identity

    @property
    def rows(self) -> list[int]:
        return [next(iter(c.values()))[0] for c in self.calls]

    async def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        self.calls.append({n: a.shape for n, a in inputs.items()})
        self.entered.set()
        if self.hold:
            await self.release.wait()
        return await self.inner.infer(inputs, outputs)

    async def aclose(self) -> None:
        await self.inner.aclose()
