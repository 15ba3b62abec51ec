"""Compact bytes for tensors: model outputs, captured inputs, and the inputs digest.

Outputs (one row's vector or scalar) are a tiny header plus the raw little-endian array:
an exact round trip at 8 bytes a float, where a JSON list costs ~20 and rounds. Inputs
are compressed npy: standard ``.npy`` records back to back, deflated at level 1 (most
of zlib's gain on tensors at a fraction of its default cost; a zip/npz container
costs several times the encoding itself per pair); small payloads skip the deflate.
BYTES tensors (object arrays of ``bytes``) are stored without pickle, as a lengths
array plus their concatenated bytes.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

_OUT_ARRAY = 1
_OUT_JSON = 2
_BYTES_SUFFIX = "\x00bytes"  # marks a BYTES tensor in the names record
_INPUTS_ZLIB = b"\x01"
_INPUTS_RAW = b"\x02"
COMPRESS_MIN_BYTES = 4096


def encode_output(value: np.ndarray | None) -> bytes | None:
    """One row's output -> bytes (None stays None)."""
    if value is None:
        return None
    arr = np.asarray(value)
    if arr.dtype.kind in "OUS":
        items = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in arr.flat]
        body = json.dumps({"shape": list(arr.shape), "items": items}).encode()
        return bytes([_OUT_JSON]) + body
    if arr.dtype.kind not in "biuf":
        arr = arr.astype(np.float64)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return _output_header(arr.dtype, arr.shape) + arr.tobytes()


@functools.lru_cache(maxsize=1024)
def _output_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    code = dtype.str.encode()
    return struct.pack(f"<BBB{len(shape)}I", _OUT_ARRAY, len(shape), len(code), *shape) + code


def decode_output(blob: bytes | None) -> np.ndarray | None:
    if blob is None:
        return None
    tag = blob[0]
    if tag == _OUT_JSON:
        data = json.loads(blob[1:])
        return np.array(data["items"], dtype=object).reshape(data["shape"])
    if tag != _OUT_ARRAY:
        raise ValueError(f"unknown output encoding {tag}")
    ndim, dlen = blob[1], blob[2]
    shape = struct.unpack_from(f"<{ndim}I", blob, 3)
    start = 3 + 4 * ndim
    dtype = np.dtype(blob[start : start + dlen].decode())
    return np.frombuffer(blob, dtype=dtype, offset=start + dlen).reshape(shape).copy()


def _is_bytes_tensor(arr: np.ndarray) -> bool:
    return arr.dtype.kind == "O"


@functools.lru_cache(maxsize=256)
def _npy_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    # The .npy header depends only on dtype and shape: build it once per pair of them.
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.empty(shape, dtype=dtype), allow_pickle=False)
    return buf.getvalue()[: buf.tell() - int(np.prod(shape)) * dtype.itemsize]


def _npy(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr)
    return _npy_header(arr.dtype, arr.shape) + arr.tobytes()


def encode_inputs(inputs: Mapping[str, np.ndarray]) -> bytes:
    """Tensors by name -> compressed npy bytes (no pickle).

    Layout: one format byte, then back-to-back standard ``.npy`` records — first the
    names (a unicode array), then each tensor; a BYTES tensor is two records, its int64
    lengths (of the tensor's shape) and its concatenated bytes. Format 1: the records
    deflated (zlib level 1); format 2: as they are, for payloads under
    ``COMPRESS_MIN_BYTES``, where zlib's fixed cost (~40 us a call) buys a few percent.
    """
    names: list[str] = []
    parts: list[bytes] = []
    for name, value in inputs.items():
        arr = np.asarray(value)
        if _is_bytes_tensor(arr):
            items = [v if isinstance(v, bytes) else bytes(v) for v in arr.flat]
            lengths = np.array([len(v) for v in items], dtype=np.int64).reshape(arr.shape)
            names.append(name + _BYTES_SUFFIX)
            parts.append(_npy(lengths))
            parts.append(_npy(np.frombuffer(b"".join(items), dtype=np.uint8)))
        else:
            names.append(name)
            parts.append(_npy(arr))
    head = _npy(np.array(names, dtype=str)) if names else _npy(np.array([], dtype="<U1"))
    body = head + b"".join(parts)
    if len(body) < COMPRESS_MIN_BYTES:
        return _INPUTS_RAW + body
    return _INPUTS_ZLIB + zlib.compress(body, 1)


def decode_inputs(blob: bytes) -> dict[str, np.ndarray]:
    if blob[:1] == _INPUTS_ZLIB:
        fh = io.BytesIO(zlib.decompress(blob[1:]))
    elif blob[:1] == _INPUTS_RAW:
        fh = io.BytesIO(memoryview(blob)[1:])
    else:
        raise ValueError("unknown inputs encoding")
    names = np.lib.format.read_array(fh, allow_pickle=False)
    out: dict[str, np.ndarray] = {}
    for raw_name in names.tolist():
        name = str(raw_name)
        if name.endswith(_BYTES_SUFFIX):
            lengths = np.lib.format.read_array(fh, allow_pickle=False)
            data = np.lib.format.read_array(fh, allow_pickle=False).tobytes()
            items = np.empty(lengths.size, dtype=object)
            pos = 0
            for i, n in enumerate(lengths.flat):
                items[i] = data[pos : pos + int(n)]
                pos += int(n)
            out[name[: -len(_BYTES_SUFFIX)]] = items.reshape(lengths.shape)
        else:
            out[name] = np.lib.format.read_array(fh, allow_pickle=False)
    return out


def inputs_digest(inputs: Mapping[str, np.ndarray]) -> str:
    """Canonical sha256 of tensors: names sorted, dtype (little-endian), shape, values.

    Used only when a record arrives without a digest; the proxy normally sets it.
    """
    h = hashlib.sha256()
    for name in sorted(inputs):
        arr = np.asarray(inputs[name])
        h.update(name.encode() + b"\0")
        h.update(repr(arr.shape).encode())
        if _is_bytes_tensor(arr):
            h.update(b"BYTES")
            for v in arr.flat:
                b = bytes(v) if not isinstance(v, bytes) else v
                h.update(struct.pack("<Q", len(b)) + b)
        else:
            arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
            h.update(arr.dtype.str.encode())
            h.update(arr.tobytes())
    return h.hexdigest()


def inputs_nbytes(inputs: Mapping[str, np.ndarray]) -> int:
    """Approximate memory held by captured tensors (for the capture cache's bound)."""
    total = 0
    for value in inputs.values():
        arr = np.asarray(value)
        if _is_bytes_tensor(arr):
            total += sum(len(v) if isinstance(v, bytes) else 64 for v in arr.flat) + 8 * arr.size
        else:
            total += arr.nbytes
    return total
