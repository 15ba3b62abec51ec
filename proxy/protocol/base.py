"""The backend interface every model runtime implements.

Tensors are numpy arrays keyed by name; BYTES tensors are numpy object arrays of
``bytes``. Batch axis is axis 0. Implementations never run synchronous inference on the
event loop (executor threads), and convert foreign errors to
:class:`proxy.core.errors.BackendError` at their boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str  # V2 datatype: BOOL, INT8..INT64, UINT8..UINT64, FP16, FP32, FP64, BYTES
    shape: tuple[int, ...]  # -1 for a dynamic dimension

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    versions: tuple[str, ...] = ("1",)


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """What a rollout records about a model: enough to reproduce the run."""

    name: str
    kind: str  # onnx | torch | http
    digest: str  # sha256 of the model file; for http the upstream URL + model name
    device: str = "cpu"
    extra: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    @property
    def metadata(self) -> ModelMetadata: ...

    @property
    def identity(self) -> ModelIdentity: ...

    async def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model; ``outputs`` selects output names (None: all)."""
        ...

    async def aclose(self) -> None: ...
