import io
import zlib

import numpy as np
import pytest

from storage.codec import (
    COMPRESS_MIN_BYTES,
    decode_inputs,
    decode_output,
    encode_inputs,
    encode_output,
    inputs_digest,
)


@pytest.mark.parametrize(
    "value",
    [
        np.array([0.1, 0.9]),
        np.array([0.25, 0.75], dtype=np.float32),
        np.float64(3.5),
        np.array(7, dtype=np.int64),
        np.array([1, 2, 3], dtype=">i4"),
        np.array([True, False]),
        np.array([], dtype=np.float32),
        np.arange(6, dtype=np.float16).reshape(2, 3),
    ],
)
def test_output_round_trip_is_exact(value):
    back = decode_output(encode_output(value))
    assert back is not None
    assert back.shape == np.asarray(value).shape
    assert back.dtype == np.asarray(value).dtype.newbyteorder("<")
    np.testing.assert_array_equal(back, value)


def test_output_is_compact_and_none_stays_none():
    blob = encode_output(np.array([0.1, 0.9]))
    assert blob is not None and len(blob) < 2 * 8 + 12  # raw floats plus a small header
    assert encode_output(None) is None and decode_output(None) is None


def test_string_outputs_round_trip_as_text():
    back = decode_output(encode_output(np.array([b"cat", "dog"], dtype=object)))
    assert back is not None and back.tolist() == ["cat", "dog"]


def test_inputs_round_trip_all_kinds():
    inputs = {
        "image": np.random.default_rng(0).normal(size=(1, 3, 4, 4)).astype(np.float32),
        "ids": np.array([[1, 2, 3]], dtype=np.int64),
        "mask": np.array([[True, False, True]]),
        "text": np.array([[b"hello", b"", b"\x00\xffbin"]], dtype=object),
        "empty": np.zeros((0, 2), dtype=np.float64),
    }
    back = decode_inputs(encode_inputs(inputs))
    assert list(back) == list(inputs)
    for name, arr in inputs.items():
        assert back[name].shape == arr.shape
        assert back[name].dtype == arr.dtype
        assert back[name].tolist() == arr.tolist()


def test_inputs_are_compressed_npy_records():
    x = np.zeros((1, 4096), dtype=np.float32)
    blob = encode_inputs({"x": x})
    assert len(blob) < x.nbytes / 10  # zeros deflate to almost nothing
    # After the format byte: zlib of standard .npy records (names, then the tensor).
    assert blob[:1] == b"\x01"
    fh = io.BytesIO(zlib.decompress(blob[1:]))
    assert np.load(fh).tolist() == ["x"]
    np.testing.assert_array_equal(np.load(fh), x)


def test_small_inputs_skip_the_deflate():
    x = np.arange(16, dtype=np.float32)
    blob = encode_inputs({"x": x})
    assert blob[:1] == b"\x02" and len(blob) < COMPRESS_MIN_BYTES
    fh = io.BytesIO(blob[1:])
    assert np.load(fh).tolist() == ["x"]
    np.testing.assert_array_equal(np.load(fh), x)
    np.testing.assert_array_equal(decode_inputs(blob)["x"], x)


def test_decode_rejects_unknown_encodings():
    with pytest.raises(ValueError):
        decode_inputs(b"\x09junk")
    with pytest.raises(ValueError):
        decode_output(b"\x09junk")


def test_digest_is_canonical():
    a = {"x": np.arange(4, dtype=np.float32), "y": np.array([b"a"], dtype=object)}
    same = {"y": np.array([b"a"], dtype=object), "x": np.arange(4, dtype=">f4")}
    assert inputs_digest(a) == inputs_digest(same)  # name order and byte order do not matter
    assert inputs_digest(a) != inputs_digest({**a, "x": np.arange(4, dtype=np.float64)})
    assert inputs_digest(a) != inputs_digest({**a, "x": np.arange(4, dtype=np.float32)[::-1]})
    reshaped = {**a, "x": np.arange(4, dtype=np.float32).reshape(2, 2)}
    assert inputs_digest(a) != inputs_digest(reshaped)
