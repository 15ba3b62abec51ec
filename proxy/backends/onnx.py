"""ONNX models on onnxruntime: one InferenceSession, run on the backend's own threads.

``device: cuda`` asks for CUDAExecutionProvider with CPUExecutionProvider behind it.
When the installed onnxruntime has no CUDA provider (the CPU wheel; ``mirrorgate[gpu]``
installs ``onnxruntime-gpu``) or the provider fails to start, the session runs on CPU: the
identity's ``device`` and ``extra["provider"]`` say which provider actually runs, read
back from the session rather than assumed from the request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from proxy.backends.files import require_file, sha256_file
from proxy.backends.threads import InferenceThreads
from proxy.backends.validation import prepare_inputs, select_outputs
from proxy.core.config import BackendSettings
from proxy.core.errors import BackendError, BadRequest, ConfigError, MirrorgateError
from proxy.protocol.base import ModelIdentity, ModelMetadata, TensorSpec

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"  # Triton's name for the same runtime
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

_ONNX_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def requested_providers(device: str, available: Sequence[str]) -> list[str]:
    """The provider list for a session on ``device``, CPU always last as the fallback."""
    if device == "cuda":
        if CUDA in available:
            return [CUDA, CPU]
        log.warning(
            "device 'cuda' requested but onnxruntime offers only %s; running on CPU "
            "(install mirrorgate[gpu] for onnxruntime-gpu)",
            ", ".join(available),
        )
    return [CPU]


def _spec(arg: ort.NodeArg) -> TensorSpec | None:
    datatype = _ONNX_TO_V2.get(arg.type)
    if datatype is None:
        return None
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorSpec(arg.name, datatype, shape)


def _read_specs(
    session: ort.InferenceSession, path: Path
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    inputs = []
    for arg in session.get_inputs():
        spec = _spec(arg)
        if spec is None:
            raise ConfigError(
                f"onnx model {str(path)!r}: input {arg.name!r} has type {arg.type}, which "
                "has no V2 datatype (supported: numeric, bool and string tensors)"
            )
        inputs.append(spec)
    outputs = []
    for arg in session.get_outputs():
        spec = _spec(arg)
        if spec is None:
            # e.g. skl2onnx's ZipMap probabilities (seq(map)): not a tensor, so not served.
            log.warning(
                "onnx model %s: output %r has type %s, which has no V2 datatype; not served",
                path,
                arg.name,
                arg.type,
            )
            continue
        outputs.append(spec)
    if not outputs:
        raise ConfigError(f"onnx model {str(path)!r} has no tensor output to serve")
    return tuple(inputs), tuple(outputs)


def _to_runtime(array: np.ndarray, spec: TensorSpec, model: str) -> np.ndarray:
    """onnxruntime reads string tensors as ``str`` objects (it would str() a bytes)."""
    if spec.datatype != "BYTES":
        return array
    out = np.empty(array.shape, dtype=object)
    flat = out.reshape(-1)
    for i, item in enumerate(array.reshape(-1).tolist()):
        try:
            flat[i] = item.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequest(
                f"model {model!r}: input {spec.name!r} is an ONNX string tensor, which "
                "holds UTF-8 text; an element is not valid UTF-8"
            ) from exc
    return out


def _from_runtime(array: object) -> np.ndarray:
    if type(array) is np.ndarray and array.dtype.kind not in "OU":
        return array  # numeric: as the runtime returned it
    result = np.asarray(array)
    if result.dtype.kind in "OU":
        out = np.empty(result.shape, dtype=object)
        flat = out.reshape(-1)
        for i, item in enumerate(result.reshape(-1).tolist()):
            flat[i] = item.encode("utf-8") if isinstance(item, str) else item
        return out
    return result


class OnnxBackend:
    """An ONNX file served by onnxruntime; see the module docstring for devices."""

    def __init__(
        self,
        *,
        session: ort.InferenceSession,
        metadata: ModelMetadata,
        identity: ModelIdentity,
        threads: InferenceThreads,
    ) -> None:
        self._session = session
        self._metadata = metadata
        self._identity = identity
        self._threads = threads
        self._specs = {s.name: s for s in metadata.inputs}
        # Only string tensors need converting for the runtime (see _to_runtime).
        self._has_strings = any(s.datatype == "BYTES" for s in metadata.inputs)

    @classmethod
    async def create(cls, settings: BackendSettings) -> OnnxBackend:
        if not settings.path:
            raise ConfigError(f"onnx backend {settings.name!r} needs 'path'")
        path = require_file(settings.path, what="onnx model")
        # Parsing and optimising a model can take seconds: not on the event loop.
        return await asyncio.to_thread(cls._load, settings, path)

    @classmethod
    def _load(cls, settings: BackendSettings, path: Path) -> OnnxBackend:
        options = ort.SessionOptions()
        if settings.threads is not None:
            options.intra_op_num_threads = settings.threads
        # Champion and candidate share the host's cores with the event loop: idle
        # intra-op threads should sleep, not spin.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = requested_providers(settings.device, ort.get_available_providers())
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise ConfigError(f"cannot load onnx model {str(path)!r}: {exc}") from exc
        active = session.get_providers()
        if settings.device == "cuda" and active[0] != CUDA:
            log.warning("onnx model %s runs on %s, not CUDA", settings.name, active[0])
        inputs, outputs = _read_specs(session, path)
        metadata = ModelMetadata(
            name=settings.name, platform=PLATFORM, inputs=inputs, outputs=outputs
        )
        identity = ModelIdentity(
            name=settings.name,
            kind="onnx",
            digest=sha256_file(path),
            device="cuda" if active[0] == CUDA else "cpu",
            extra={
                "provider": active[0],
                "providers": ",".join(active),
                "requested_device": settings.device,
                "onnxruntime": ort.__version__,
                "path": str(path),
            },
        )
        threads = InferenceThreads(f"onnx-{settings.name}")
        return cls(session=session, metadata=metadata, identity=identity, threads=threads)

    @property
    def metadata(self) -> ModelMetadata:
        return self._metadata

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    @property
    def provider(self) -> str:
        """The execution provider that actually runs the model."""
        return self._identity.extra["provider"]

    async def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        model = self._metadata.name
        names = select_outputs(model, outputs, self._metadata.outputs)
        try:
            return await self._threads.run(self._run, inputs, names)
        except MirrorgateError:
            raise
        except Exception as exc:
            raise self._convert(exc) from exc

    def run_sync(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """``infer`` without the hop: for a caller that already runs on its own thread
        (the micro-batcher's workers), never on the event loop. Same checks, same errors;
        the session is safe to call from several threads."""
        try:
            names = select_outputs(self._metadata.name, outputs, self._metadata.outputs)
            return self._run(inputs, names)
        except MirrorgateError:
            raise
        except Exception as exc:
            raise self._convert(exc) from exc

    def _convert(self, exc: Exception) -> MirrorgateError:
        model = self._metadata.name
        if isinstance(exc, InvalidArgument):  # shapes/dtypes the request got wrong
            return BadRequest(f"model {model!r} rejected the request: {exc}")
        return BackendError(f"model {model!r} failed: {exc}")

    def _run(self, inputs: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        """On a worker thread: checks and conversions are O(size), so they stay off the
        loop too (BYTES tensors are converted element by element)."""
        model = self._metadata.name
        feed = prepare_inputs(model, inputs, self._metadata.inputs)
        if self._has_strings:
            feed = {n: _to_runtime(a, self._specs[n], model) for n, a in feed.items()}
        results = self._session.run(names, feed)
        if len(names) == 1:  # the common case, once per (stacked) call: no comprehension
            return {names[0]: _from_runtime(results[0])}
        return {name: _from_runtime(r) for name, r in zip(names, results, strict=True)}

    async def aclose(self) -> None:
        await self._threads.aclose()
