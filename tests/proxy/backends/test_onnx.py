"""OnnxBackend: every V2 datatype, casts, providers, load errors, runtime faults."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from proxy.backends.datatypes import DATATYPES, V2_TO_NUMPY
from proxy.backends.onnx import CPU, CUDA, OnnxBackend, requested_providers
from proxy.core.config import BackendSettings
from proxy.core.errors import BackendError, BadRequest, ConfigError, MirrorgateError
from proxy.protocol.base import TensorSpec
from tests.proxy import models


def _settings(path: Path, **kw: object) -> BackendSettings:
    return BackendSettings.model_validate({"name": "m", "kind": "onnx", "path": str(path), **kw})


def _values(datatype: str) -> np.ndarray:
    """Two rows of three values that stress the datatype's range."""
    if datatype == "BYTES":
        items = [b"", b"plain", "\u00e9t\u00e9 \u2603".encode(), b"a\x00b", b"x" * 300, b"z"]
        return np.array(items, dtype=object).reshape(2, 3)
    dtype = V2_TO_NUMPY[datatype]
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if dtype.kind in "iu":
        info = np.iinfo(dtype)  # type: ignore[type-var]
        return np.array([[info.min, 0, info.max], [1, info.max - 1, 7]], dtype=dtype)
    info_f = np.finfo(dtype)  # type: ignore[arg-type]
    return np.array([[info_f.min, -0.0, info_f.max], [info_f.tiny, np.inf, -1.5]], dtype=dtype)


@pytest.mark.parametrize("datatype", DATATYPES)
async def test_every_v2_datatype_round_trips(tmp_path: Path, datatype: str) -> None:
    path = tmp_path / f"id_{datatype}.onnx"
    models.build_onnx_identity(path, datatype)
    backend = await OnnxBackend.create(_settings(path))
    try:
        assert backend.metadata.inputs == (TensorSpec("x", datatype, (-1, 3)),)
        assert backend.metadata.outputs == (TensorSpec("y", datatype, (-1, 3)),)
        x = _values(datatype)
        y = (await backend.infer({"x": x}))["y"]
        assert y.dtype == x.dtype and y.shape == x.shape
        assert y.tolist() == x.tolist()
        if datatype == "BYTES":
            assert all(isinstance(v, bytes) for v in y.reshape(-1))
    finally:
        await backend.aclose()


async def test_bytes_that_are_not_utf8_are_a_bad_request(tmp_path: Path) -> None:
    path = tmp_path / "str.onnx"
    models.build_onnx_identity(path, "BYTES")
    backend = await OnnxBackend.create(_settings(path))
    try:
        with pytest.raises(BadRequest, match="UTF-8"):
            await backend.infer({"x": np.array([[b"ok", b"\xff", b"ok"]], dtype=object)})
        with pytest.raises(BadRequest, match="not bytes"):
            await backend.infer({"x": np.array([[b"ok", 3, b"ok"]], dtype=object)})
    finally:
        await backend.aclose()


@pytest.mark.parametrize(
    ("source", "target"), [("INT32", "FP64"), ("FP32", "INT64"), ("UINT8", "BOOL")]
)
async def test_cast_models_declare_and_return_the_target_type(
    tmp_path: Path, source: str, target: str
) -> None:
    path = tmp_path / "cast.onnx"
    models.build_onnx_cast(path, source, target)
    backend = await OnnxBackend.create(_settings(path))
    try:
        assert backend.metadata.inputs[0].datatype == source
        assert backend.metadata.outputs[0].datatype == target
        x = np.array([[0, 1, 2], [3, 4, 5]], dtype=V2_TO_NUMPY[source])
        y = (await backend.infer({"x": x}))["y"]
        assert y.dtype == V2_TO_NUMPY[target]
        np.testing.assert_array_equal(y, x.astype(V2_TO_NUMPY[target]))
    finally:
        await backend.aclose()


def test_provider_list_keeps_cpu_behind_cuda() -> None:
    assert requested_providers("cpu", [CUDA, CPU]) == [CPU]
    assert requested_providers("cuda", [CUDA, CPU]) == [CUDA, CPU]
    assert requested_providers("cuda", [CPU]) == [CPU]


async def test_cuda_without_a_cuda_provider_falls_back_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """This machine's onnxruntime has no CUDA provider: the real fallback path."""
    import onnxruntime as ort

    if CUDA in ort.get_available_providers():
        pytest.skip("a CUDA provider is installed here; benchmarks/gpu_check.py covers it")
    path = tmp_path / "c.onnx"
    weights = models.build_onnx_classifier(path)
    with caplog.at_level(logging.WARNING, logger="proxy.backends.onnx"):
        backend = await OnnxBackend.create(_settings(path, device="cuda", threads=1))
    try:
        assert backend.identity.device == "cpu"
        assert backend.provider == CPU
        assert backend.identity.extra["requested_device"] == "cuda"
        assert backend._session.get_session_options().intra_op_num_threads == 1
        assert "running on CPU" in caplog.text
        x = weights.sample(3)
        out = await backend.infer({"x": x})
        np.testing.assert_allclose(out["probs"], weights.probs(x), rtol=1e-5, atol=1e-6)
    finally:
        await backend.aclose()


async def test_missing_and_corrupt_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        await OnnxBackend.create(_settings(tmp_path / "absent.onnx"))
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf")
    with pytest.raises(ConfigError, match="cannot load onnx model"):
        await OnnxBackend.create(_settings(garbage))


async def test_non_tensor_outputs_are_left_out(tmp_path: Path) -> None:
    """skl2onnx classifiers return probabilities as seq(map) via ZipMap: not servable."""
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["scores"]),
            helper.make_node(
                "ZipMap", ["x"], ["zipped"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2]
            ),
        ],
        "zip",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3]),
            helper.make_value_info(
                "zipped",
                helper.make_sequence_type_proto(
                    helper.make_map_type_proto(
                        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
                    )
                ),
            ),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)],
    )
    model.ir_version = 8
    path = tmp_path / "zip.onnx"
    onnx.save(model, str(path))
    backend = await OnnxBackend.create(_settings(path))
    try:
        assert [s.name for s in backend.metadata.outputs] == ["scores"]
        x = np.ones((2, 3), np.float32)
        assert list(await backend.infer({"x": x})) == ["scores"]
    finally:
        await backend.aclose()


async def test_runtime_faults_of_a_request_keep_their_cause(tmp_path: Path) -> None:
    path = tmp_path / "lookup.onnx"
    table = np.arange(10, dtype=np.float32).reshape(5, 2)
    models.build_onnx_lookup(path, table)
    backend = await OnnxBackend.create(_settings(path))
    try:
        out = await backend.infer({"ids": np.array([[4], [0]])})
        np.testing.assert_array_equal(out["rows"][:, 0], table[[4, 0]])
        with pytest.raises(MirrorgateError, match="out of data bounds") as info:
            await backend.infer({"ids": np.array([[1], [9]])})
        assert isinstance(info.value, (BadRequest, BackendError))
        assert info.value.__cause__ is not None
        out = await backend.infer({"ids": np.array([[2]])})  # still serving
        np.testing.assert_array_equal(out["rows"][0, 0], table[2])
    finally:
        await backend.aclose()


async def test_fixed_dimensions_are_reported_and_enforced(tmp_path: Path) -> None:
    path = tmp_path / "fixed.onnx"
    models.build_onnx_fixed_batch(path, 3)
    backend = await OnnxBackend.create(_settings(path))
    try:
        assert backend.metadata.inputs == (TensorSpec("x", "FP32", (1, 3)),)
        with pytest.raises(BadRequest, match=r"expected \[1, 3\]"):
            await backend.infer({"x": np.zeros((2, 3), np.float32)})
    finally:
        await backend.aclose()
