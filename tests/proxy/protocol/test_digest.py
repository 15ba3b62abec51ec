"""The canonical inputs digest: stable, order-independent over names, sensitive to content."""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from proxy.protocol.digest import inputs_digest


def test_digest_is_canonical() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([b"x", b"yz"], dtype=object)
    d = inputs_digest({"a": a, "b": b})
    assert d == inputs_digest({"b": b, "a": a})  # name order does not matter
    assert d == inputs_digest({"a": np.asfortranarray(a), "b": b})  # memory layout neither
    assert len(d) == 64


def test_digest_follows_the_documented_canonical_form() -> None:
    # Changing the form would orphan every stored pinned-failure key: pin it.
    def u64(n: int) -> bytes:
        return struct.pack("<Q", n)

    payload = np.array([1, -2], dtype="<i4").tobytes()
    blob = u64(1) + b"a" + u64(5) + b"INT32" + u64(1) + u64(2) + payload
    blob += u64(1) + b"s" + u64(5) + b"BYTES" + u64(1) + u64(1) + u64(2) + b"hi"
    expected = hashlib.sha256(blob).hexdigest()
    inputs = {"s": np.array([b"hi"], dtype=object), "a": np.array([1, -2], np.int32)}
    assert inputs_digest(inputs) == expected


def test_digest_separates_what_matters() -> None:
    base = {"a": np.zeros((1, 2), np.float32)}
    d = inputs_digest(base)
    assert d != inputs_digest({"a": np.zeros((1, 2), np.float64)})  # dtype
    assert d != inputs_digest({"a": np.zeros((2, 1), np.float32)})  # shape
    assert d != inputs_digest({"b": np.zeros((1, 2), np.float32)})  # name
    assert d != inputs_digest({"a": np.array([[0, 1]], np.float32)})  # values
    # BYTES element boundaries matter: ["ab", "c"] != ["a", "bc"].
    assert inputs_digest({"s": np.array([b"ab", b"c"], object)}) != inputs_digest(
        {"s": np.array([b"a", b"bc"], object)}
    )


def test_row_digest_equals_the_row_alone() -> None:
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    for row in range(4):
        assert inputs_digest({"x": x}, row) == inputs_digest({"x": x[row]})
