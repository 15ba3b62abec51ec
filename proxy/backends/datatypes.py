"""V2 (Open Inference Protocol) datatypes and their numpy dtypes.

BYTES tensors are numpy object arrays of ``bytes`` (see :mod:`proxy.protocol.base`).
BF16 has no numpy dtype, so runtimes that declare it are refused at load time.
"""

from __future__ import annotations

import numpy as np

from proxy.core.errors import BadRequest

V2_TO_NUMPY: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}

_NUMPY_TO_V2 = {dtype: name for name, dtype in V2_TO_NUMPY.items()}

DATATYPES: tuple[str, ...] = tuple(V2_TO_NUMPY)


def numpy_dtype(datatype: str) -> np.dtype[np.generic]:
    """The numpy dtype carrying a V2 datatype; BadRequest for an unknown name."""
    try:
        return V2_TO_NUMPY[datatype]
    except KeyError:
        raise BadRequest(f"unknown datatype {datatype!r}") from None


def v2_datatype(dtype: np.dtype[np.generic]) -> str:
    """The V2 datatype of a numpy dtype: str/bytes arrays count as BYTES."""
    if dtype.kind in "OSU":
        return "BYTES"
    try:
        return _NUMPY_TO_V2[dtype.newbyteorder("=")]
    except KeyError:
        raise BadRequest(f"numpy dtype {dtype} has no V2 datatype") from None
