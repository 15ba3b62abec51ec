"""Non-finite numbers at the boundary: refused in JSON unless the input is declared
(``server.nonfinite_inputs``), never emitted as a bare NaN token (real codec)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from proxy.core.errors import BadRequest
from proxy.protocol.codec import encode_infer_response, parse_infer_request

BODY = (
    b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [NaN, 1e999]},'
    b' {"name": "y", "datatype": "FP32", "shape": [1, 1], "data": [0.5]}]}'
)


def test_refused_by_default_and_accepted_where_declared() -> None:
    with pytest.raises(BadRequest, match="non-finite"):
        parse_infer_request(BODY)
    for allowed in (["x"], ["*"]):
        parsed = parse_infer_request(BODY, allow_nonfinite=allowed)
        x = parsed.inputs["x"]
        assert np.isnan(x[0, 0]) and np.isposinf(x[0, 1])
    with pytest.raises(BadRequest, match="'x' has a non-finite"):
        parse_infer_request(BODY, allow_nonfinite=["y"])


def test_non_finite_outputs_go_binary_never_bare_nan() -> None:
    out = {"probs": np.array([[np.nan, 1.0]], dtype=np.float32)}
    body, header_length = encode_infer_response(out, model_name="m")
    assert header_length is not None  # binary tail: exact IEEE bits
    header = json.loads(body[:header_length])  # strict JSON: parses
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 8
    assert b"NaN" not in body[:header_length]
    tail = np.frombuffer(body[header_length:], dtype=np.float32)
    assert np.isnan(tail[0]) and tail[1] == 1.0
