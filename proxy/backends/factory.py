"""Build a backend from its settings: the runtime, wrapped for concurrency when asked."""

from __future__ import annotations

import importlib

from prometheus_client import CollectorRegistry

from proxy.backends.base import Backend
from proxy.config import BackendSettings

# kind -> "module:Class"; each class has ``async classmethod create(settings) -> Backend``.
_RUNTIMES = {
    "onnx": "proxy.backends.onnx:OnnxBackend",
    "torch": "proxy.backends.torch:TorchBackend",
    "http": "proxy.backends.http:HttpBackend",
}


async def create_backend(
    settings: BackendSettings, registry: CollectorRegistry | None = None
) -> Backend:
    """The backend ``settings`` describe; in-process ones with ``max_batch_size > 1`` are
    wrapped in a :class:`~proxy.backends.batching.BatchingBackend` whose batch-size
    histogram goes to ``registry``."""
    module_name, cls_name = _RUNTIMES[settings.kind].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    backend: Backend = await cls.create(settings)
    if settings.kind != "http" and settings.batching.max_batch_size > 1:
        from proxy.backends.batching import BatchingBackend

        backend = BatchingBackend(backend, settings.batching, registry)
    return backend
