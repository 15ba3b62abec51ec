"""Input checks: names, shapes, and casts that keep every value exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.backends.datatypes import V2_TO_NUMPY, numpy_dtype, v2_datatype
from proxy.backends.validation import coerce_input, prepare_inputs, select_outputs
from proxy.core.errors import BadRequest
from proxy.protocol.base import TensorSpec

NUMERIC = [d for d in V2_TO_NUMPY if d not in ("BYTES",)]


def _spec(datatype: str, shape: tuple[int, ...] = (-1,)) -> TensorSpec:
    return TensorSpec("x", datatype, shape)


def _exactly_representable(value: int | float | bool, datatype: str) -> bool:
    """Independent oracle: does ``value`` survive as ``datatype`` unchanged?"""
    dtype = V2_TO_NUMPY[datatype]
    if datatype == "BOOL":
        return value in (0, 1)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)  # type: ignore[type-var]
        return float(value).is_integer() and info.min <= int(value) <= info.max
    with np.errstate(all="ignore"):
        stored = dtype.type(value)
    return bool(np.isfinite(stored) or not np.isfinite(value)) and (
        float(stored) == value or (np.isnan(value) and np.isnan(stored))
    )


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(
        st.one_of(
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
            st.sampled_from([0, 1, -1, 2**24, 2**24 + 1, 2**53 + 1, 255, 256, -129]),
        ),
        min_size=1,
        max_size=6,
    ),
    target=st.sampled_from(NUMERIC),
)
def test_int64_casts_exactly_or_refuses(values: list[int], target: str) -> None:
    array = np.array(values, dtype=np.int64)
    expected_ok = all(_exactly_representable(v, target) for v in values)
    try:
        out = coerce_input("m", "x", array, _spec(target))
    except BadRequest:
        assert not expected_ok
    else:
        assert expected_ok
        assert out.dtype == V2_TO_NUMPY[target]
        assert [int(v) for v in out.tolist()] == values


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(
        st.one_of(
            st.floats(allow_nan=False, width=64),
            st.sampled_from([0.5, 0.1, 1e10, 3.0, -2.0, 65504.0, 65520.0, 2.0**-30]),
        ),
        min_size=1,
        max_size=6,
    ),
    target=st.sampled_from(NUMERIC),
)
def test_float64_casts_exactly_or_refuses(values: list[float], target: str) -> None:
    array = np.array(values, dtype=np.float64)
    expected_ok = all(_exactly_representable(v, target) for v in values)
    try:
        out = coerce_input("m", "x", array, _spec(target))
    except BadRequest:
        assert not expected_ok
    else:
        assert expected_ok
        assert out.astype(np.float64).tolist() == values


def test_safe_widening_is_always_accepted() -> None:
    out = coerce_input("m", "x", np.array([1.5, -2.25], np.float32), _spec("FP64"))
    assert out.dtype == np.float64 and out.tolist() == [1.5, -2.25]
    out = coerce_input("m", "x", np.array([True, False]), _spec("INT8"))
    assert out.tolist() == [1, 0]


def test_non_native_byte_order_is_normalised() -> None:
    out = coerce_input("m", "x", np.array([1.0, 2.0], dtype=">f4"), _spec("FP32"))
    assert out.dtype == np.float32 and out.dtype.isnative and out.tolist() == [1.0, 2.0]


def test_bytes_inputs_accept_str_and_bytes_arrays() -> None:
    out = coerce_input("m", "x", np.array(["é", "b"]), _spec("BYTES"))
    assert out.dtype == object and out.tolist() == ["é".encode(), b"b"]
    out = coerce_input("m", "x", np.array([b"a", b"bc"]), _spec("BYTES"))
    assert out.tolist() == [b"a", b"bc"]
    with pytest.raises(BadRequest, match="is BYTES, got FP32"):
        coerce_input("m", "x", np.zeros(2, np.float32), _spec("BYTES"))


def test_prepare_orders_inputs_as_declared_and_checks_shapes() -> None:
    specs = [TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "INT64", (-1,))]
    got = prepare_inputs("m", {"b": np.array([1]), "a": np.zeros((1, 2), np.float32)}, specs)
    assert list(got) == ["a", "b"]
    with pytest.raises(BadRequest, match=r"input 'a' has shape \[1, 3\], expected \[-1, 2\]"):
        prepare_inputs("m", {"b": np.array([1]), "a": np.zeros((1, 3), np.float32)}, specs)
    loose = prepare_inputs(
        "m", {"b": np.array([1]), "a": np.zeros((1, 3), np.float32)}, specs, check_shapes=False
    )
    assert loose["a"].shape == (1, 3)
    with pytest.raises(BadRequest, match="missing input"):
        prepare_inputs("m", {"a": np.zeros((1, 2), np.float32)}, specs)


def test_select_outputs_defaults_to_all_and_dedupes() -> None:
    specs = [_spec("FP32"), TensorSpec("y", "FP32", (-1,))]
    assert select_outputs("m", None, specs) == ["x", "y"]
    assert select_outputs("m", ["y", "y"], specs) == ["y"]


def test_datatype_names_map_both_ways() -> None:
    for name, dtype in V2_TO_NUMPY.items():
        assert numpy_dtype(name) == dtype
        assert v2_datatype(dtype) == name
    assert v2_datatype(np.dtype("U3")) == "BYTES"
    with pytest.raises(BadRequest):
        numpy_dtype("FP8")
    with pytest.raises(BadRequest):
        v2_datatype(np.dtype(np.complex64))
