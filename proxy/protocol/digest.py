"""Canonical sha256 of a request's input tensors (one row of them, or all).

The digest identifies "the same inputs" across runs, replicas and replays: pinned
failures are keyed on it. Canonical form, fed to sha256 for each input in sorted name
order: ``len(name) name len(datatype) datatype ndim dims... payload`` where lengths and
dims are 8-byte little-endian unsigned integers, the datatype is the V2 name, and the
payload is the C-order little-endian bytes (BYTES: each element as its 8-byte length then
its bytes). A batched row is digested with the batch axis removed, so row 3 of a batch
digests the same as that row sent alone with shape ``[1, ...]`` minus the leading 1.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

import numpy as np

from proxy.protocol.codec import DATATYPES, datatype_of

_U64 = struct.Struct("<Q")


def _update_array(h: hashlib._Hash, array: np.ndarray) -> None:
    datatype = datatype_of(array)
    h.update(_U64.pack(len(datatype)) + datatype.encode())
    h.update(_U64.pack(array.ndim) + b"".join(_U64.pack(d) for d in array.shape))
    if datatype == "BYTES":
        for item in array.reshape(-1):
            raw = item if isinstance(item, bytes) else str(item).encode("utf-8")
            h.update(_U64.pack(len(raw)) + raw)
    else:
        h.update(np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes())


def inputs_digest(inputs: Mapping[str, np.ndarray], row: int | None = None) -> str:
    """Hex sha256 of all inputs, or of row ``row`` of each (batch axis 0)."""
    h = hashlib.sha256()
    for name in sorted(inputs):
        array = inputs[name] if row is None else inputs[name][row]
        encoded = name.encode("utf-8")
        h.update(_U64.pack(len(encoded)) + encoded)
        _update_array(h, np.asarray(array))
    return h.hexdigest()
