"""PyTorch models: a TorchScript file, a ``torch.export`` program (``.pt2``), or a
``module:factory`` import string returning an ``nn.Module``.

torch is an optional extra: without it, creating this backend is a ConfigError that
names ``pip install 'mirrorgate[torch]'``. Inputs and outputs are resolved by
:mod:`proxy.backends.torch_io`. Runs use ``torch.inference_mode()`` on the backend's own
threads. ``device: cuda`` needs a CUDA build of torch and a visible GPU; unlike the onnx
backend there is no silent CPU fallback, because a torch model can pin tensors to a
device inside its code and a CPU run may then fail (or be far slower) in surprising ways.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from proxy.backends import torch_io
from proxy.backends.files import require_file, sha256_file
from proxy.backends.threads import InferenceThreads
from proxy.backends.torch_io import TorchIO
from proxy.backends.validation import prepare_inputs, select_outputs
from proxy.core.config import BackendSettings
from proxy.core.errors import BackendError, BadRequest, ConfigError, MirrorgateError
from proxy.protocol.base import ModelIdentity, ModelMetadata

INSTALL_HINT = "pip install 'mirrorgate[torch]'"
PLATFORMS = {
    "torchscript": "pytorch_libtorch",  # Triton's name for TorchScript models
    "export": "pytorch_export",
    "factory": "pytorch_module",
}


def import_torch() -> ModuleType:
    """The torch module, or a ConfigError naming the extra that installs it."""
    try:
        import torch
    except ImportError as exc:
        raise ConfigError(
            f"the torch backend needs PyTorch, which is not installed: {INSTALL_HINT}"
        ) from exc
    return torch


def _v2_map(torch: ModuleType) -> dict[Any, str]:
    return {
        torch.bool: "BOOL",
        torch.int8: "INT8",
        torch.int16: "INT16",
        torch.int32: "INT32",
        torch.int64: "INT64",
        torch.uint8: "UINT8",
        torch.uint16: "UINT16",
        torch.uint32: "UINT32",
        torch.uint64: "UINT64",
        torch.float16: "FP16",
        torch.float32: "FP32",
        torch.float64: "FP64",
    }


def detect_format(path: Path) -> str:
    """``export`` or ``torchscript`` from the archive's contents (both are zip files)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(
            f"torch model {str(path)!r} is neither a TorchScript file nor a torch.export "
            f"program (not a zip archive: {exc})"
        ) from exc
    if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
        return "export"
    if any(n.endswith("/constants.pkl") for n in names) or any("/code/" in n for n in names):
        return "torchscript"
    raise ConfigError(
        f"torch model {str(path)!r} is neither a TorchScript file (torch.jit.save) nor a "
        "torch.export program (torch.export.save); a pickled module or state_dict needs "
        "'factory' to build the module"
    )


def _resolve_factory(spec: str) -> Callable[[], Any]:
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise ConfigError(f"torch factory {spec!r} must look like 'package.module:callable'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"torch factory {spec!r}: cannot import {module_name!r}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise ConfigError(f"torch factory {spec!r}: no attribute {part!r}") from exc
    if not callable(target):
        raise ConfigError(f"torch factory {spec!r} is not callable")
    return target


def _state_digest(torch: ModuleType, module: Any, factory: str) -> str:
    """sha256 over the factory string and every parameter and buffer, in order."""
    digest = hashlib.sha256(factory.encode())
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _forward_arity(fn: Any) -> int | None:
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    return sum(
        p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        for p in params
    )


class _Loaded:
    """What ``_load`` produces: the callable, its io and how it was found."""

    def __init__(
        self, call: Callable[..., Any], io: TorchIO, fmt: str, digest: str, source: str
    ) -> None:
        self.call = call
        self.io = io
        self.fmt = fmt
        self.digest = digest
        self.source = source


def _load(torch: ModuleType, settings: BackendSettings, device: str) -> _Loaded:
    if settings.factory:
        return _load_factory(torch, settings, device)
    assert settings.path is not None
    path = require_file(settings.path, what="torch model")
    fmt = detect_format(path)
    sidecar = torch_io.read_sidecar(path)
    where = repr(str(path))
    try:
        if fmt == "export":
            program = torch.export.load(str(path))
            if device != "cpu":
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, device)
            io = sidecar or torch_io.from_export(program, _v2_map(torch), where)
            torch_io.check_arity(io, len(program.graph_signature.user_inputs), where)
            call = program.module()
        else:
            with warnings.catch_warnings():
                # torch deprecates TorchScript in favour of torch.export; serving existing
                # TorchScript files is this format's whole point, so don't nag per load.
                warnings.simplefilter("ignore", DeprecationWarning)
                script = torch.jit.load(str(path), map_location=device)
            script.eval()
            io = sidecar or torch_io.from_script_schema(script)
            torch_io.check_arity(io, len(script.forward.schema.arguments) - 1, where)
            call = script
    except MirrorgateError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot load torch model {where}: {exc}") from exc
    return _Loaded(call, io, fmt, sha256_file(path), str(path))


def _load_factory(torch: ModuleType, settings: BackendSettings, device: str) -> _Loaded:
    spec = settings.factory
    assert spec is not None
    build = _resolve_factory(spec)
    try:
        module = build()
    except Exception as exc:
        raise ConfigError(f"torch factory {spec!r} failed: {exc}") from exc
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(
            f"torch factory {spec!r} returned {type(module).__name__}, not a torch.nn.Module"
        )
    io: TorchIO | None = torch_io.from_attribute(module, spec)
    digest: str
    if settings.path:
        # factory + path: the factory builds the architecture, the file holds its weights.
        path = require_file(settings.path, what="torch weights")
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            module.load_state_dict(state)
        except Exception as exc:
            raise ConfigError(f"cannot load weights {str(path)!r} into {spec!r}: {exc}") from exc
        io = io or torch_io.read_sidecar(path)
        digest = sha256_file(path)
    else:
        digest = _state_digest(torch, module, spec)
    module = module.to(device).eval()
    if io is None:
        io = torch_io.from_signature(module)
    torch_io.check_arity(io, _forward_arity(module.forward), repr(spec))
    return _Loaded(module, io, "factory", digest, spec)


class TorchBackend:
    """A torch model run in inference mode on the backend's own threads."""

    def __init__(
        self,
        *,
        torch: ModuleType,
        call: Callable[..., Any],
        io: TorchIO,
        metadata: ModelMetadata,
        identity: ModelIdentity,
        threads: InferenceThreads,
        device: str,
    ) -> None:
        self._torch = torch
        self._call = call
        self._io = io
        self._metadata = metadata
        self._identity = identity
        self._threads = threads
        self._device = device

    @classmethod
    async def create(cls, settings: BackendSettings) -> TorchBackend:
        torch = import_torch()
        if not (settings.path or settings.factory):
            raise ConfigError(f"torch backend {settings.name!r} needs 'path' or 'factory'")
        device = settings.device
        if device == "cuda" and not torch.cuda.is_available():
            why = "no GPU is visible" if torch.backends.cuda.is_built() else "a CPU-only build"
            raise ConfigError(
                f"torch backend {settings.name!r}: device 'cuda' requested but "
                f"torch {torch.__version__} cannot use CUDA ({why}); use device: cpu"
            )
        if settings.threads is not None:
            # torch's intra-op pool is process-wide: the last backend to set it wins.
            torch.set_num_threads(settings.threads)
        loaded = await asyncio.to_thread(_load, torch, settings, device)
        metadata = ModelMetadata(
            name=settings.name,
            platform=PLATFORMS[loaded.fmt],
            inputs=loaded.io.inputs,
            outputs=loaded.io.outputs,
        )
        identity = ModelIdentity(
            name=settings.name,
            kind="torch",
            digest=loaded.digest,
            device=device,
            extra={
                "format": loaded.fmt,
                "source": loaded.source,
                "io": loaded.io.source,
                "torch": str(torch.__version__),
            },
        )
        return cls(
            torch=torch,
            call=loaded.call,
            io=loaded.io,
            metadata=metadata,
            identity=identity,
            threads=InferenceThreads(f"torch-{settings.name}"),
            device=device,
        )

    @property
    def metadata(self) -> ModelMetadata:
        return self._metadata

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    async def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        model = self._metadata.name
        io = self._io
        wanted: Sequence[str] | None = outputs
        if io.outputs_known:
            wanted = select_outputs(model, outputs, io.outputs)
        try:
            result = await self._threads.run(self._run, inputs)
        except MirrorgateError:
            raise
        except Exception as exc:
            raise BackendError(f"model {model!r} failed: {exc}") from exc
        named = self._name(result)
        if wanted is None:
            return named
        unknown = [n for n in wanted if n not in named]
        if unknown:
            raise BadRequest(
                f"model {model!r}: unknown output(s) {unknown}; it returned {list(named)}"
            )
        return {n: named[n] for n in dict.fromkeys(wanted)}

    def _run(self, inputs: dict[str, np.ndarray]) -> Any:
        """On a worker thread: checks, numpy in, torch model, numpy out (same nesting)."""
        torch = self._torch
        io = self._io
        prepared = prepare_inputs(
            self._metadata.name, inputs, io.inputs, check_shapes=io.check_shapes
        )
        tensors = []
        for spec in io.inputs:
            # A private copy: torch shares numpy memory, and a model that works in place
            # must not change the request that the other model of the pair also reads.
            array = np.array(prepared[spec.name], order="C", copy=True)
            tensors.append(torch.from_numpy(array).to(self._device))
        with torch.inference_mode():
            result = self._call(*tensors)
        return self._to_numpy(result)

    def _to_numpy(self, value: Any) -> Any:
        torch = self._torch
        if isinstance(value, torch.Tensor):
            if value.dtype == torch.bfloat16:  # numpy has no bfloat16: widen exactly
                value = value.float()
            return value.detach().cpu().numpy()
        if isinstance(value, (tuple, list)):
            return [self._to_numpy(v) for v in value]
        if isinstance(value, dict):
            return {str(k): self._to_numpy(v) for k, v in value.items()}
        raise BackendError(
            f"model {self._metadata.name!r} returned {type(value).__name__}, not tensors"
        )

    def _name(self, result: Any) -> dict[str, np.ndarray]:
        model = self._metadata.name
        if isinstance(result, dict):
            named: dict[str, Any] = result
        else:
            seq = result if isinstance(result, list) else [result]
            if any(not isinstance(r, np.ndarray) for r in seq):
                raise BackendError(f"model {model!r} returned nested outputs; declare flat ones")
            if self._io.outputs_known:
                declared = [s.name for s in self._io.outputs]
                if len(seq) != len(declared):
                    raise BackendError(
                        f"model {model!r} returned {len(seq)} tensors, "
                        f"{len(declared)} declared ({', '.join(declared)})"
                    )
                named = dict(zip(declared, seq, strict=True))
            else:
                named = {f"output__{i}": r for i, r in enumerate(seq)}
        if any(not isinstance(v, np.ndarray) for v in named.values()):
            raise BackendError(f"model {model!r} returned nested outputs; declare flat ones")
        return named

    async def aclose(self) -> None:
        await self._threads.aclose()
