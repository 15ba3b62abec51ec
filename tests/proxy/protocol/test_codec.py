"""V2 codec: property-based round trips for every datatype, and every malformed input."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from proxy.core.errors import BackendError, BadRequest
from proxy.protocol.base import ModelMetadata, TensorSpec
from proxy.protocol.codec import (
    DATATYPES,
    InferRequest,
    RequestedOutput,
    datatype_of,
    decode_infer_response,
    encode_infer_request,
    encode_infer_response,
    parse_infer_request,
    validate_request,
)

NUMERIC = [d for d in DATATYPES if d != "BYTES"]
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


@st.composite
def tensors(draw: st.DrawFn, datatype: str, text_only: bool = False) -> np.ndarray:
    shape = draw(SHAPES)
    if datatype == "BYTES":
        n = int(np.prod(shape))
        element = (
            st.text(max_size=8).map(lambda s: s.encode("utf-8"))
            if text_only
            else st.binary(max_size=8)
        )
        items = draw(st.lists(element, min_size=n, max_size=n))
        arr = np.empty(n, dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    dtype = DATATYPES[datatype]
    return draw(hnp.arrays(dtype=dtype, shape=shape))


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert datatype_of(a) == datatype_of(b)
    if a.dtype == object:
        assert list(a.reshape(-1)) == list(b.reshape(-1))
    else:
        # assert_array_equal treats NaN == NaN; also compare bit patterns for floats.
        np.testing.assert_array_equal(a, b)


def _finite(a: np.ndarray) -> bool:
    return a.dtype.kind not in "fc" or bool(np.isfinite(a).all())


@pytest.mark.parametrize("datatype", list(DATATYPES))
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_request_round_trip_every_datatype(datatype: str, binary: bool, data: Any) -> None:
    x = data.draw(tensors(datatype, text_only=not binary))
    y = data.draw(tensors("FP32"))
    body, header_length = encode_infer_request({"x": x, "y": y}, binary=binary, request_id="r")
    # NaN/Infinity cannot be JSON: such a tensor is sent binary whatever was asked.
    assert (header_length is not None) == (binary or not (_finite(x) and _finite(y)))
    parsed = parse_infer_request(body, header_length)
    assert parsed.id == "r"
    assert list(parsed.inputs) == ["x", "y"]
    assert_same(parsed.inputs["x"], x)
    assert_same(parsed.inputs["y"], y)


@pytest.mark.parametrize("datatype", list(DATATYPES))
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_response_round_trip_mixed_binary_and_json(datatype: str, data: Any) -> None:
    a = data.draw(tensors(datatype, text_only=True))
    b = data.draw(tensors(datatype))
    request = InferRequest(
        id="r",
        inputs={},
        outputs=[RequestedOutput("a", binary=False), RequestedOutput("b", binary=True)],
    )
    body, header_length = encode_infer_response(
        {"b": b, "a": a, "unrequested": a}, model_name="m", request_id="r", request=request
    )
    assert header_length is not None
    header = json.loads(body[:header_length])
    assert [o["name"] for o in header["outputs"]] == ["a", "b"]
    assert ("data" in header["outputs"][0]) == _finite(a)
    assert "binary_data_size" in header["outputs"][1]["parameters"]
    decoded = decode_infer_response(body, header_length)
    assert decoded.model_name == "m" and decoded.id == "r"
    assert_same(decoded.outputs["a"], a)
    assert_same(decoded.outputs["b"], b)


def test_request_level_binary_data_output_and_per_output_override() -> None:
    body = json.dumps(
        {
            "inputs": [{"name": "x", "datatype": "INT32", "shape": [2], "data": [1, 2]}],
            "outputs": [{"name": "p", "parameters": {"binary_data": False}}, {"name": "q"}],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    req = parse_infer_request(body)
    assert req.binary_data_output is True
    assert req.wants_binary("p") is False
    assert req.wants_binary("q") is True
    assert req.output_names() == ["p", "q"]


def test_nested_json_data_is_row_major() -> None:
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP64", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]}
    ).encode()
    np.testing.assert_array_equal(parse_infer_request(body).inputs["x"], [[1, 2], [3, 4]])


def test_non_utf8_bytes_output_requested_as_json_falls_back_to_binary() -> None:
    out = np.array([b"\xff\xfe", b"ok"], dtype=object)
    body, header_length = encode_infer_response({"o": out}, model_name="m")
    assert header_length is not None
    assert list(decode_infer_response(body, header_length).outputs["o"]) == [b"\xff\xfe", b"ok"]


def _json_body(inputs: list[dict[str, Any]], **extra: Any) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def _x(**fields: Any) -> dict[str, Any]:
    return {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0], **fields}


def _binary(header: dict[str, Any], tail: bytes) -> tuple[bytes, str]:
    head = json.dumps(header).encode()
    return head + tail, str(len(head))


BAD_REQUESTS: list[tuple[str, bytes, str | None, str]] = [
    ("malformed json", b'{"inputs": [', None, "not valid JSON"),
    ("empty body", b"", None, "empty"),
    ("json array", b"[1, 2]", None, "must be a JSON object"),
    ("invalid utf-8", b'{"inputs": "\xff"}', None, "not valid UTF-8"),
    ("deeply nested json", b"[" * 100_000 + b"]" * 100_000, None, "nested too deeply"),
    ("no inputs", b"{}", None, "no 'inputs'"),
    ("empty inputs", _json_body([]), None, "no inputs"),
    ("inputs not a list", b'{"inputs": {}}', None, "must be a list"),
    ("wrong datatype", _json_body([_x(datatype="FLOAT")]), None, "unknown datatype 'FLOAT'"),
    ("bad shape", _json_body([_x(shape=[1, -2])]), None, "non-negative integers"),
    ("bool in shape", _json_body([_x(shape=[True, 2])]), None, "non-negative integers"),
    (
        "shape data mismatch",
        _json_body([_x(shape=[2, 2])]),
        None,
        "shape [2, 2] needs 4 elements, data has 2",
    ),
    ("ragged data", _json_body([_x(data=[[1.0], [2.0, 3.0]])]), None, "ragged"),
    ("strings for FP32", _json_body([_x(data=["a", "b"])]), None, "must be numbers"),
    (
        "float for INT8",
        _json_body([_x(datatype="INT8", data=[1.5, 2])]),
        None,
        "must be integers",
    ),
    (
        "out of range INT8",
        _json_body([_x(datatype="INT8", data=[1, 300])]),
        None,
        "out of range for INT8",
    ),
    ("numbers for BOOL", _json_body([_x(datatype="BOOL", data=[1, 0])]), None, "true/false"),
    (
        "numbers for BYTES",
        _json_body([_x(datatype="BYTES", data=[1, 2])]),
        None,
        "must be strings",
    ),
    (
        "lone surrogate in BYTES",
        _json_body([_x(datatype="BYTES", data=["\ud800", "a"])]),
        None,
        "not valid UTF-8",
    ),
    (
        "nested data too deep",
        _json_body([_x(shape=[1], data=json.loads("[" * 40 + "1" + "]" * 40))]),
        None,
        "nested too deeply",
    ),
    ("duplicate input", _json_body([_x(), _x()]), None, "more than once"),
    ("no data", _json_body([{"name": "x", "datatype": "FP32", "shape": [1]}]), None, "no 'data'"),
    ("bad id", _json_body([_x()], id=5), None, "'id' must be a string"),
    (
        "binary_data_output not bool",
        _json_body([_x()], parameters={"binary_data_output": "yes"}),
        None,
        "binary_data_output must be true or false",
    ),
    (
        "classification extension",
        _json_body([_x()], outputs=[{"name": "p", "parameters": {"classification": 2}}]),
        None,
        "classification extension is not supported",
    ),
    (
        "shared memory",
        _json_body([_x(parameters={"shared_memory_region": "r"})]),
        None,
        "shared-memory",
    ),
    ("header length not a number", _json_body([_x()]), "abc", "non-negative integer"),
    ("header length past the body", _json_body([_x()]), "99999", "body has only"),
    ("header length absurd", _json_body([_x()]), str(10**30), "body has only"),
]


def _binary_cases() -> list[tuple[str, bytes, str | None, str]]:
    def header(**params: Any) -> dict[str, Any]:
        return {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "parameters": params}]
        }

    eight = np.array([1.0, 2.0], dtype="<f4").tobytes()

    def bytes_header(size: int) -> dict[str, Any]:
        return {
            "inputs": [
                {
                    "name": "s",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": size},
                }
            ]
        }

    cases = [
        (
            "binary size past the body",
            *_binary(header(binary_data_size=64), eight),
            "runs past the body",
        ),
        (
            "huge binary size",
            *_binary(header(binary_data_size=2**62), eight),
            "runs past the body",
        ),
        (
            "binary size disagrees with shape",
            *_binary(header(binary_data_size=4), eight[:4]),
            "needs 8 bytes",
        ),
        ("negative binary size", *_binary(header(binary_data_size=-1), eight), "non-negative"),
        ("unused trailing bytes", *_binary(header(binary_data_size=8), eight + b"xx"), "unused"),
        (
            "binary and data",
            *_binary({"inputs": [_x(parameters={"binary_data_size": 8})]}, eight),
            "has both 'data' and binary_data_size",
        ),
        (
            "bad BYTES length prefix",
            *_binary(bytes_header(9), struct.pack("<I", 200) + b"abcde"),
            "declares 200 bytes",
        ),
        (
            "truncated BYTES prefix",
            *_binary(bytes_header(7), struct.pack("<I", 1) + b"a\x00\x00"),
            "truncated BYTES length prefix",
        ),
        (
            "too few BYTES elements",
            *_binary(bytes_header(5), struct.pack("<I", 1) + b"a"),
            "needs 2 BYTES elements, binary data has 1",
        ),
        (
            "too many BYTES elements",
            *_binary(bytes_header(15), (struct.pack("<I", 1) + b"a") * 3),
            "more than the 2 elements",
        ),
    ]
    return cases  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [c[1:] for c in BAD_REQUESTS + _binary_cases()],
    ids=[c[0] for c in BAD_REQUESTS + _binary_cases()],
)
def test_bad_request_names_the_fault(body: bytes, header_length: str | None, message: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_infer_request(body, header_length)
    assert message in err.value.message
    assert err.value.status == 400


METADATA = ModelMetadata(
    name="m",
    platform="test",
    inputs=(TensorSpec("x", "FP32", (-1, 2)),),
    outputs=(TensorSpec("p", "FP32", (-1, 3)),),
)


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        ({"z": np.zeros((1, 2), np.float32)}, None, "unknown input 'z'; model 'm' takes: x"),
        ({"x": np.zeros((1, 2), np.float64)}, None, "has datatype FP64; the model expects FP32"),
        ({"x": np.zeros((1, 3), np.float32)}, None, "has shape [1, 3]; the model expects [-1, 2]"),
        ({"x": np.zeros((2,), np.float32)}, None, "has shape [2]"),
        ({"x": np.zeros((1, 2), np.float32)}, ["nope"], "unknown output 'nope'"),
    ],
)
def test_validate_against_metadata(
    inputs: dict[str, np.ndarray], outputs: list[str] | None, message: str
) -> None:
    request = InferRequest(
        id=None,
        inputs=inputs,
        outputs=None if outputs is None else [RequestedOutput(n) for n in outputs],
    )
    with pytest.raises(BadRequest) as err:
        validate_request(request, METADATA)
    assert message in err.value.message


def test_validate_accepts_dynamic_batch() -> None:
    request = InferRequest(id=None, inputs={"x": np.zeros((5, 2), np.float32)})
    validate_request(request, METADATA)


def test_missing_input_is_reported() -> None:
    meta = ModelMetadata("m", "t", (TensorSpec("x", "FP32", ()), TensorSpec("w", "FP32", ())), ())
    with pytest.raises(BadRequest, match="missing input"):
        validate_request(InferRequest(id=None, inputs={"x": np.zeros(1, np.float32)}), meta)


def test_malformed_upstream_response_is_a_backend_error() -> None:
    with pytest.raises(BackendError, match="malformed V2 response"):
        decode_infer_response(b"<html>", None)
    with pytest.raises(BackendError, match="no 'outputs'"):
        decode_infer_response(b'{"model_name": "m"}', None)
