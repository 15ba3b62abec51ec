"""Build a backend from its settings: the runtime, wrapped for concurrency when asked."""

from __future__ import annotations

import importlib

from prometheus_client import CollectorRegistry

from proxy.core.config import BackendSettings
from proxy.core.errors import ConfigError
from proxy.protocol.base import Backend

# kind -> "module:Class"; each class has ``async classmethod create(settings) -> Backend``.
_RUNTIMES = {
    "onnx": "proxy.backends.onnx:OnnxBackend",
    "torch": "proxy.backends.torch:TorchBackend",
    "http": "proxy.backends.http:HttpBackend",
}


# runtime module -> the extra that installs it (the core install has only `http`)
EXTRAS = {"onnxruntime": "onnx", "torch": "torch"}


async def create_backend(
    settings: BackendSettings, registry: CollectorRegistry | None = None
) -> Backend:
    """The backend ``settings`` describe; in-process ones with ``max_batch_size > 1`` are
    wrapped in a :class:`~proxy.backends.batching.BatchingBackend` whose batch-size
    histogram goes to ``registry``."""
    module_name, cls_name = _RUNTIMES[settings.kind].split(":")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except ModuleNotFoundError as exc:
        extra = EXTRAS.get(exc.name or "")
        if extra is None:
            raise
        raise ConfigError(
            f"a {settings.kind} backend needs {exc.name}, which is not installed: "
            f"pip install 'mirrorgate[{extra}]'"
        ) from exc
    backend: Backend = await cls.create(settings)
    if settings.kind != "http" and settings.batching.max_batch_size > 1:
        from proxy.backends.batching import BatchingBackend

        backend = BatchingBackend(backend, settings.batching, registry)
    return backend
