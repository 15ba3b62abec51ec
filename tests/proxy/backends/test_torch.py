"""TorchBackend: the three sources, io resolution, datatypes, errors, devices, threads."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from proxy.backends.datatypes import DATATYPES, V2_TO_NUMPY
from proxy.backends.torch import TorchBackend, detect_format
from proxy.core.config import BackendSettings
from proxy.core.errors import BackendError, BadRequest, ConfigError
from proxy.protocol.base import TensorSpec
from tests.proxy import models

torch = pytest.importorskip("torch")
tm = pytest.importorskip("tests.proxy.torch_models")


def _settings(**kw: object) -> BackendSettings:
    return BackendSettings.model_validate({"name": "t", "kind": "torch", **kw})


async def _create(**kw: object) -> TorchBackend:
    return await TorchBackend.create(_settings(**kw))


async def test_export_program_declares_its_own_signature(tmp_path: Path) -> None:
    path = tmp_path / "m.pt2"
    weights = models.build_torch_export_classifier(path, 5, 2, seed=4, declare_io=False)
    backend = await _create(path=str(path))
    try:
        assert backend.metadata.platform == "pytorch_export"
        assert backend.identity.extra["io"] == "export"
        assert backend.metadata.inputs == (TensorSpec("x", "FP32", (-1, 5)),)
        assert backend.metadata.outputs == (
            TensorSpec("output__0", "FP32", (-1, 2)),
            TensorSpec("output__1", "INT64", (-1,)),
        )
        x = weights.sample(6)
        out = await backend.infer({"x": x})
        np.testing.assert_allclose(out["output__0"], weights.probs(x), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out["output__1"], weights.labels(x))
        with pytest.raises(BadRequest, match="shape"):
            await backend.infer({"x": np.zeros((2, 4), np.float32)})
    finally:
        await backend.aclose()


async def test_torchscript_without_declaration_uses_the_convention(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    weights = models.build_torchscript_classifier(path, 4, 3, seed=5, declare_io=False)
    backend = await _create(path=str(path))
    try:
        assert backend.metadata.platform == "pytorch_libtorch"
        assert backend.identity.extra["io"] == "convention"
        assert backend.metadata.inputs == (TensorSpec("x", "FP32", (-1, -1)),)
        # The schema says Tuple[Tensor, Tensor]: two outputs, named by position.
        assert [s.name for s in backend.metadata.outputs] == ["output__0", "output__1"]
        x = weights.sample(3)
        out = await backend.infer({"x": x.astype(np.float64).round(0)}, outputs=["output__1"])
        np.testing.assert_array_equal(out["output__1"], weights.labels(x.round(0)))
        # Shapes are placeholders, not enforced: the runtime's complaint is a backend error.
        with pytest.raises(BackendError) as info:
            await backend.infer({"x": np.zeros((2, 7), np.float32)})
        assert info.value.__cause__ is not None
    finally:
        await backend.aclose()


async def test_factory_without_declaration_names_outputs_when_it_runs() -> None:
    backend = await _create(factory="tests.proxy.torch_models:make_undeclared_classifier")
    try:
        assert backend.metadata.platform == "pytorch_module"
        assert [s.name for s in backend.metadata.inputs] == ["x"]
        weights = models.classifier_weights(tm.FACTORY_FEATURES, tm.FACTORY_CLASSES, 7)
        x = weights.sample(2)
        out = await backend.infer({"x": x})
        assert sorted(out) == ["output__0", "output__1"]
        np.testing.assert_array_equal(out["output__1"], weights.labels(x))
        with pytest.raises(BadRequest, match="nope"):
            await backend.infer({"x": x}, outputs=["nope"])
    finally:
        await backend.aclose()


async def test_dict_outputs_are_named_by_their_keys() -> None:
    backend = await _create(factory="tests.proxy.torch_models:make_dict_outputs")
    try:
        x = np.array([[1.0, -2.0]], np.float32)
        out = await backend.infer({"x": x})
        np.testing.assert_array_equal(out["double"], 2 * x)
        np.testing.assert_array_equal(out["negated"], -x)
        assert list(await backend.infer({"x": x}, outputs=["negated"])) == ["negated"]
    finally:
        await backend.aclose()


async def test_factory_with_a_weights_file_loads_them(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    weights = models.build_torch_state_dict(path, 4, 3, seed=11)
    backend = await _create(factory="tests.proxy.torch_models:make_classifier", path=str(path))
    try:
        assert backend.identity.digest == hashlib.sha256(path.read_bytes()).hexdigest()
        x = weights.sample(4)
        out = await backend.infer({"x": x})
        np.testing.assert_allclose(out["probs"], weights.probs(x), rtol=1e-5, atol=1e-6)
    finally:
        await backend.aclose()


async def test_factory_digest_follows_the_weights() -> None:
    spec = "tests.proxy.torch_models:make_classifier"
    a, b = await _create(factory=spec), await _create(factory=spec)
    other = await _create(factory="tests.proxy.torch_models:make_identity")
    try:
        assert a.identity.digest == b.identity.digest
        assert a.identity.digest != other.identity.digest
        assert a.identity.extra["source"] == spec
    finally:
        for backend in (a, b, other):
            await backend.aclose()


@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d != "BYTES"])
async def test_declared_datatypes_round_trip(tmp_path: Path, datatype: str) -> None:
    path = tmp_path / f"id_{datatype}.pt"
    models.build_torchscript_identity(path, datatype)
    backend = await _create(path=str(path))
    try:
        assert backend.metadata.inputs == (TensorSpec("x", datatype, (-1, 3)),)
        dtype = V2_TO_NUMPY[datatype]
        x = np.arange(6).reshape(2, 3).astype(dtype)
        y = (await backend.infer({"x": x}))["y"]
        assert y.dtype == dtype
        np.testing.assert_array_equal(y, x)
    finally:
        await backend.aclose()


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("no_colon_here", "package.module:callable"),
        ("tests.proxy.no_such_module:make", "cannot import"),
        ("tests.proxy.torch_models:missing", "no attribute 'missing'"),
        ("tests.proxy.torch_models:FACTORY_SEED", "not callable"),
        ("tests.proxy.torch_models:make_not_a_module", "not a torch.nn.Module"),
        ("tests.proxy.torch_models:make_failing", "exploded on purpose"),
    ],
)
async def test_factory_faults_are_config_errors(factory: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        await _create(factory=factory)


async def test_files_that_are_not_torch_models_are_config_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a zip"):
        await _create(path=str(garbage))
    state = tmp_path / "state.pt"
    models.build_torch_state_dict(state)
    with pytest.raises(ConfigError, match="'factory'"):
        detect_format(state)
    with pytest.raises(ConfigError, match="does not exist"):
        await _create(path=str(tmp_path / "absent.pt"))


@pytest.mark.parametrize(
    ("declaration", "message"),
    [
        ("{not json", "not readable JSON"),
        (json.dumps({"inputs": [], "outputs": []}), "inputs"),
        (
            json.dumps(
                {
                    "inputs": [{"name": "x", "datatype": "FP33", "shape": [-1]}],
                    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
                }
            ),
            "unknown datatype 'FP33'",
        ),
        (
            json.dumps(
                {
                    "inputs": [{"name": "x", "datatype": "BYTES", "shape": [-1]}],
                    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
                }
            ),
            "cannot hold BYTES",
        ),
        (
            json.dumps(
                {
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "dims": 1}],
                    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
                }
            ),
            r"inputs\.0\.dims: unknown key",
        ),
        (
            json.dumps(
                {
                    "inputs": [
                        {"name": "x", "datatype": "FP32", "shape": [-1]},
                        {"name": "z", "datatype": "FP32", "shape": [-1]},
                    ],
                    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
                }
            ),
            "2 inputs declared, the model takes 1",
        ),
    ],
)
async def test_bad_declarations_are_config_errors(
    tmp_path: Path, declaration: str, message: str
) -> None:
    path = tmp_path / "m.pt"
    models.build_torchscript_identity(path, "FP32")
    (tmp_path / "m.io.json").write_text(declaration)
    with pytest.raises(ConfigError, match=message):
        await _create(path=str(path))


async def test_declared_outputs_must_match_what_the_model_returns(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    models.build_torchscript_identity(path, "FP32")
    spec = {"datatype": "FP32", "shape": [-1, 3]}
    models.write_torch_io(
        path,
        {
            "inputs": [{"name": "x", **spec}],
            "outputs": [{"name": "y", **spec}, {"name": "z", **spec}],
        },
    )
    backend = await _create(path=str(path))
    try:
        with pytest.raises(BackendError, match="returned 1 tensors, 2 declared"):
            await backend.infer({"x": np.zeros((1, 3), np.float32)})
    finally:
        await backend.aclose()


async def test_a_model_working_in_place_leaves_the_request_alone() -> None:
    backend = await _create(factory="tests.proxy.torch_models:make_in_place")
    try:
        x = np.zeros((2, 3), np.float32)
        out = await backend.infer({"x": x})
        np.testing.assert_array_equal(out["output__0"], np.ones((2, 3), np.float32))
        np.testing.assert_array_equal(x, np.zeros((2, 3), np.float32))
    finally:
        await backend.aclose()


async def test_without_torch_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # Real torch is installed here; hiding it from the import system is the only way to
    # exercise the path a torch-less install takes.
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ConfigError, match=r"pip install 'mirrorgate\[torch\]'"):
        await _create(factory="tests.proxy.torch_models:make_identity")


async def test_cuda_without_a_gpu_is_a_config_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here; benchmarks/gpu_check.py covers the CUDA path")
    with pytest.raises(ConfigError, match="device 'cuda' requested"):
        await _create(factory="tests.proxy.torch_models:make_identity", device="cuda")


async def test_the_event_loop_serves_while_a_model_blocks() -> None:
    """The model waits for an event that only the event loop sets: if inference ran on the
    loop, the loop could never set it and the model would time out instead."""
    tm.GATE_ENTERED.clear()
    tm.GATE_RELEASE.clear()
    tm.GATE_RELEASED_BY_EVENT.clear()
    backend = await _create(factory="tests.proxy.torch_models:make_gated")
    try:
        call = asyncio.create_task(backend.infer({"x": np.zeros((1, 2), np.float32)}))
        assert await asyncio.to_thread(tm.GATE_ENTERED.wait, 60)
        tm.GATE_RELEASE.set()
        out = await call
        np.testing.assert_array_equal(out["output__0"], np.ones((1, 2), np.float32))
        assert tm.GATE_RELEASED_BY_EVENT == [True]
    finally:
        await backend.aclose()
