"""Open Inference Protocol (KServe V2) REST codec: pure functions, no I/O.

Both directions of both representations:

* JSON tensors: ``{"name", "datatype", "shape", "data"}`` with ``data`` flat or nested in
  row-major order (BYTES elements are strings, BOOL elements are ``true``/``false``).
* The binary tensor data extension (Triton's): the JSON header is followed by raw tensor
  bytes; the header's length is sent in ``Inference-Header-Content-Length``; each binary
  tensor carries ``parameters.binary_data_size``; a requested output asks for binary with
  ``parameters.binary_data`` and a request asks for binary outputs by default with
  ``parameters.binary_data_output``. Numbers are little-endian, C order. A binary BYTES
  tensor is each element as a 4-byte little-endian length followed by its bytes.

This is what ``tritonclient.http`` sends and expects (``_utils._get_inference_request``,
``InferInput.set_data_from_numpy``, ``InferResult``): binary inputs by default, and
``binary_data_output: true`` when no outputs are named.

Every malformed input raises :class:`proxy.core.errors.BadRequest` with a message naming the
tensor and the fault; decoding a peer's *response* raises :class:`BackendError` instead
(the fault is upstream's, not the client's).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from proxy.core.errors import BackendError, BadRequest
from proxy.protocol.base import ModelMetadata, TensorSpec

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_HEADER_DIGITS = 18  # any length a body can have, far below int64

# V2 datatype -> numpy dtype (little-endian, which is also the wire order).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

_KIND_SIZE_TO_DATATYPE = {
    ("b", 1): "BOOL",
    ("i", 1): "INT8",
    ("i", 2): "INT16",
    ("i", 4): "INT32",
    ("i", 8): "INT64",
    ("u", 1): "UINT8",
    ("u", 2): "UINT16",
    ("u", 4): "UINT32",
    ("u", 8): "UINT64",
    ("f", 2): "FP16",
    ("f", 4): "FP32",
    ("f", 8): "FP64",
}

# numpy's own limit is 32 (1.x) / 64 (2.x) dimensions; no model takes more than a handful.
MAX_NDIM = 32
# Nesting of tensor ``data`` beyond this is rejected before numpy sees it.
MAX_DATA_DEPTH = MAX_NDIM + 1
_LEN = struct.Struct("<I")


# --------------------------------------------------------------------------- datatypes


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise BadRequest(f"unknown datatype {datatype!r}") from None


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype of an array; str/bytes/object arrays are BYTES."""
    kind = array.dtype.kind
    if kind in "OSU":
        return "BYTES"
    name = _KIND_SIZE_TO_DATATYPE.get((kind, array.dtype.itemsize))
    if name is None:
        raise BackendError(f"numpy dtype {array.dtype} has no V2 datatype")
    return name


# --------------------------------------------------------------------------- data shapes


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: follow the request's binary_data_output


@dataclass(slots=True)
class InferRequest:
    """A parsed V2 infer request."""

    id: str | None
    inputs: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[RequestedOutput] | None = None  # None: every output
    binary_data_output: bool = False

    def output_names(self) -> list[str] | None:
        return None if self.outputs is None else [o.name for o in self.outputs]

    def wants_binary(self, name: str) -> bool:
        for out in self.outputs or ():
            if out.name == name and out.binary is not None:
                return out.binary
        return self.binary_data_output


@dataclass(slots=True)
class InferResponse:
    """A decoded V2 infer response (what an upstream server answered)."""

    model_name: str
    model_version: str | None
    id: str | None
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


class _Fault(Exception):
    """Internal: a decoding fault, mapped to BadRequest or BackendError by the caller."""


def _parse_header_length(value: str | int | None, body_len: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        # ASCII digits only ("²".isdigit() is True and int() refuses it), bounded length
        # (int() of thousands of digits is quadratic work for one header).
        if not (text.isascii() and text.isdigit()):
            raise _Fault(
                f"{HEADER_LENGTH} must be a non-negative integer in ASCII digits, "
                f"got {value[:40]!r}"
            )
        if len(text) > MAX_HEADER_DIGITS:
            raise _Fault(
                f"{HEADER_LENGTH} has {len(text)} digits but the body has only {body_len} bytes"
            )
        length = int(text)
    else:
        length = int(value)
    if length < 0:
        raise _Fault(f"{HEADER_LENGTH} must be a non-negative integer, got {value!r}")
    if length > body_len:
        raise _Fault(f"{HEADER_LENGTH} is {length} but the body has only {body_len} bytes")
    return length


def _has_nonfinite(array: np.ndarray) -> bool:
    return array.dtype.kind in "fc" and array.size > 0 and not bool(np.isfinite(array).all())


def _refuse_constant(name: str) -> Any:
    raise _Fault(f"non-finite number {name} is not JSON (RFC 8259) and not accepted")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Fault(f"number {text[:40]} overflows to infinity")
    return value


def _load_json(blob: bytes | memoryview, what: str, *, finite: bool = False) -> dict[str, Any]:
    """``finite``: refuse NaN/Infinity and overflowing numbers (requests from clients)."""
    try:
        text = bytes(blob).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Fault(f"{what} is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise _Fault(f"{what} is empty")
    try:
        if finite:
            doc = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
        else:
            doc = json.loads(text)
    except RecursionError:
        raise _Fault(f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise _Fault(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _Fault(f"{what} must be a JSON object, got {type(doc).__name__}")
    return doc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_shape(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise _Fault(f"{where}: 'shape' must be a list of non-negative integers")
    if len(raw) > MAX_NDIM:
        raise _Fault(f"{where}: shape has {len(raw)} dimensions, at most {MAX_NDIM} allowed")
    for dim in raw:
        if not _is_int(dim) or dim < 0:
            raise _Fault(f"{where}: 'shape' must be a list of non-negative integers, got {raw}")
    return tuple(raw)


def _count(shape: Sequence[int]) -> int:
    return math.prod(shape)  # Python ints: no overflow on absurd shapes


def _data_depth_ok(data: Any) -> bool:
    """True when ``data`` nests lists no deeper than MAX_DATA_DEPTH (iterative)."""
    level: list[Any] = [data]
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DATA_DEPTH:
            return False
        nxt: list[Any] = []
        for item in level:
            if isinstance(item, list):
                nxt.extend(x for x in item if isinstance(x, list))
        level = nxt
    return True


def _flatten(data: Any) -> list[Any]:
    out: list[Any] = []
    stack: list[Any] = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def _flatten_strings(data: Any, where: str) -> list[str]:
    out: list[str] = []
    stack: list[Any] = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            out.append(item)
        else:
            raise _Fault(f"{where}: BYTES data must be strings, got {type(item).__name__}")
    return out


def _json_data_to_array(data: Any, datatype: str, shape: tuple[int, ...], where: str) -> Any:
    if not isinstance(data, list):
        data = [data]
    if not _data_depth_ok(data):
        raise _Fault(f"{where}: 'data' is nested too deeply")
    expected = _count(shape)
    if datatype == "BYTES":
        strings = _flatten_strings(data, where)
        if len(strings) != expected:
            raise _Fault(
                f"{where}: shape {list(shape)} needs {expected} elements, data has {len(strings)}"
            )
        arr = np.empty(len(strings), dtype=object)
        try:
            arr[:] = [s.encode("utf-8") for s in strings]
        except UnicodeEncodeError:
            raise _Fault(f"{where}: BYTES data is not valid UTF-8 text") from None
        return arr.reshape(shape)
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError):
        raise _Fault(f"{where}: 'data' is ragged or not a list of numbers") from None
    if raw.size != expected:
        raise _Fault(f"{where}: shape {list(shape)} needs {expected} elements, data has {raw.size}")
    target = DATATYPES[datatype]
    if raw.size:
        kind = raw.dtype.kind
        if datatype == "BOOL":
            if kind != "b":
                raise _Fault(f"{where}: BOOL data must be true/false")
        elif target.kind in "iu":
            info = np.iinfo(target)
            if kind in "iu":
                lo, hi = int(raw.min()), int(raw.max())
            else:
                # Mixed magnitudes (e.g. 0 and 2**63) make numpy pick float or object:
                # check the Python ints themselves, exactly.
                values = _flatten(data)
                if not all(_is_int(v) for v in values):
                    raise _Fault(f"{where}: {datatype} data must be integers")
                lo, hi = min(values), max(values)
                raw = np.array(values, dtype=object)
            if lo < info.min or hi > info.max:
                raise _Fault(f"{where}: value out of range for {datatype}")
        elif kind not in "iuf":
            raise _Fault(f"{where}: {datatype} data must be numbers")
    with np.errstate(over="ignore", invalid="ignore"):  # FP16 overflow -> inf, as a cast does
        return raw.astype(target).reshape(shape)


def _split_bytes(buf: memoryview, count: int, where: str) -> np.ndarray:
    out = np.empty(count, dtype=object)
    offset, n, end = 0, 0, len(buf)
    while offset < end:
        if n >= count:
            raise _Fault(f"{where}: BYTES data has more than the {count} elements of its shape")
        if end - offset < 4:
            raise _Fault(f"{where}: truncated BYTES length prefix at offset {offset}")
        (length,) = _LEN.unpack_from(buf, offset)
        offset += 4
        if length > end - offset:
            raise _Fault(
                f"{where}: BYTES element {n} declares {length} bytes, "
                f"only {end - offset} remain in the tensor data"
            )
        out[n] = bytes(buf[offset : offset + length])
        offset += length
        n += 1
    if n != count:
        raise _Fault(f"{where}: shape needs {count} BYTES elements, binary data has {n}")
    return out


def _binary_to_array(
    buf: memoryview, datatype: str, shape: tuple[int, ...], where: str
) -> np.ndarray:
    count = _count(shape)
    if datatype == "BYTES":
        return _split_bytes(buf, count, where).reshape(shape)
    dtype = DATATYPES[datatype]
    if count * dtype.itemsize != len(buf):
        raise _Fault(
            f"{where}: shape {list(shape)} of {datatype} needs {count * dtype.itemsize} bytes, "
            f"binary_data_size is {len(buf)}"
        )
    # Copy: the body buffer is read-only and backends (torch.from_numpy) want to own data.
    return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()


def _decode_tensors(
    entries: Any, binary: memoryview, kind: str, *, check_bool: bool = True
) -> dict[str, np.ndarray]:
    """Decode the ``inputs``/``outputs`` list of a request/response."""
    if not isinstance(entries, list):
        raise _Fault(f"'{kind}s' must be a list of tensors")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise _Fault(f"{kind} {i} must be a JSON object")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise _Fault(f"{kind} {i}: 'name' must be a non-empty string")
        where = f"{kind} {name!r}"
        if name in tensors:
            raise _Fault(f"{where} appears more than once")
        datatype = entry.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise _Fault(
                f"{where}: unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}"
            )
        shape = _check_shape(entry.get("shape"), where)
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise _Fault(f"{where}: 'parameters' must be an object")
        if "shared_memory_region" in params:
            raise _Fault(f"{where}: the shared-memory extension is not supported")
        size = params.get("binary_data_size")
        if size is not None:
            if not _is_int(size) or size < 0:
                raise _Fault(f"{where}: binary_data_size must be a non-negative integer")
            if "data" in entry:
                raise _Fault(f"{where}: has both 'data' and binary_data_size")
            if size > len(binary) - offset:
                raise _Fault(
                    f"{where}: binary_data_size {size} runs past the body "
                    f"({len(binary) - offset} bytes of binary data left)"
                )
            tensors[name] = _binary_to_array(binary[offset : offset + size], datatype, shape, where)
            offset += size
        elif "data" in entry:
            tensors[name] = _json_data_to_array(entry["data"], datatype, shape, where)
        else:
            raise _Fault(f"{where}: no 'data' and no binary_data_size")
    if offset != len(binary):
        raise _Fault(
            f"{len(binary) - offset} bytes of binary data after the last binary {kind} are unused"
        )
    return tensors


def _bool_param(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _Fault(f"{where} must be true or false")
    return value


def _decode_requested_outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise _Fault("'outputs' must be a list")
    outs: list[RequestedOutput] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise _Fault(f"requested output {i} must be a JSON object")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise _Fault(f"requested output {i}: 'name' must be a non-empty string")
        if name in seen:
            raise _Fault(f"requested output {name!r} appears more than once")
        seen.add(name)
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise _Fault(f"requested output {name!r}: 'parameters' must be an object")
        if "shared_memory_region" in params:
            raise _Fault(f"requested output {name!r}: shared memory is not supported")
        if params.get("classification"):
            raise _Fault(
                f"requested output {name!r}: the classification extension is not supported"
            )
        binary = params.get("binary_data")
        outs.append(
            RequestedOutput(
                name,
                None if binary is None else _bool_param(binary, f"output {name!r} binary_data"),
            )
        )
    return outs


def _split_body(
    body: bytes | bytearray | memoryview,
    header_length: str | int | None,
    what: str,
    *,
    finite: bool = False,
) -> tuple[dict[str, Any], memoryview]:
    view = memoryview(body)
    length = _parse_header_length(header_length, len(view))
    if length is None:
        return _load_json(view, what, finite=finite), view[len(view) :]
    return _load_json(view[:length], what, finite=finite), view[length:]


def _optional_id(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _Fault("'id' must be a string")
    return value


# --------------------------------------------------------------------------- requests


def parse_infer_request(
    body: bytes | bytearray | memoryview,
    header_length: str | int | None = None,
    *,
    allow_nonfinite: Collection[str] = (),
) -> InferRequest:
    """Parse a V2 infer request body (JSON, or JSON header + binary tensors).

    JSON NaN/Infinity (and numbers overflowing to infinity) are refused unless the
    input's name is in ``allow_nonfinite`` ("*": every input); with any name allowed,
    the inputs not allowed are checked after decoding instead."""
    try:
        doc, binary = _split_body(body, header_length, "request JSON", finite=not allow_nonfinite)
        params = doc.get("parameters") or {}
        if not isinstance(params, dict):
            raise _Fault("'parameters' must be an object")
        if "inputs" not in doc:
            raise _Fault("request has no 'inputs'")
        inputs = _decode_tensors(doc["inputs"], binary, "input")
        if not inputs:
            raise _Fault("request has no inputs")
        if allow_nonfinite and "*" not in allow_nonfinite:
            for name, array in inputs.items():
                if name not in allow_nonfinite and _has_nonfinite(array):
                    raise _Fault(f"input {name!r} has a non-finite number (NaN or Infinity)")
        bdo = params.get("binary_data_output", False)
        return InferRequest(
            id=_optional_id(doc.get("id")),
            inputs=inputs,
            parameters=params,
            outputs=_decode_requested_outputs(doc.get("outputs")),
            binary_data_output=_bool_param(bdo, "binary_data_output"),
        )
    except _Fault as exc:
        raise BadRequest(str(exc)) from None


def _shape_fits(spec: TensorSpec, shape: tuple[int, ...]) -> bool:
    if not spec.shape:
        return True  # backend declared no shape
    if len(spec.shape) != len(shape):
        return False
    return all(want < 0 or want == got for want, got in zip(spec.shape, shape, strict=True))


def validate_request(request: InferRequest, metadata: ModelMetadata) -> None:
    """Check names, datatypes and shapes against a model's metadata (BadRequest).

    A backend that declares no inputs/outputs (a torch module without specs) is not
    checked on that side.
    """
    if metadata.inputs:
        specs = {s.name: s for s in metadata.inputs}
        expected = ", ".join(specs)
        for name, array in request.inputs.items():
            spec = specs.get(name)
            if spec is None:
                raise BadRequest(
                    f"unknown input {name!r}; model {metadata.name!r} takes: {expected}"
                )
            got = datatype_of(array)
            if spec.datatype in DATATYPES and got != spec.datatype:
                raise BadRequest(
                    f"input {name!r} has datatype {got}; the model expects {spec.datatype}"
                )
            if not _shape_fits(spec, array.shape):
                raise BadRequest(
                    f"input {name!r} has shape {list(array.shape)}; the model expects "
                    f"{list(spec.shape)} (-1: any size)"
                )
        missing = [name for name in specs if name not in request.inputs]
        if missing:
            raise BadRequest(f"missing input(s) {', '.join(missing)}; model takes: {expected}")
    for name, array in request.inputs.items():
        if 0 in array.shape:
            # Nothing to infer; a model would be called (twice) for an empty answer.
            raise BadRequest(f"input {name!r} has shape {list(array.shape)}: an empty batch")
    if metadata.outputs and request.outputs is not None:
        known = {s.name for s in metadata.outputs}
        for out in request.outputs:
            if out.name not in known:
                raise BadRequest(
                    f"unknown output {out.name!r}; model {metadata.name!r} gives: "
                    f"{', '.join(sorted(known))}"
                )


# --------------------------------------------------------------------------- encoding


def _bytes_elements(array: np.ndarray) -> list[bytes]:
    out: list[bytes] = []
    for item in array.reshape(-1):
        if isinstance(item, bytes | bytearray | np.bytes_):
            out.append(bytes(item))
        elif isinstance(item, str | np.str_):
            out.append(str(item).encode("utf-8"))
        else:
            out.append(str(item).encode("utf-8"))
    return out


def _tensor_binary(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(_LEN.pack(len(b)) + b for b in _bytes_elements(array))
    return np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()


def _tensor_json_data(array: np.ndarray, datatype: str) -> list[Any] | None:
    """Flat JSON data, or None when the tensor cannot be JSON (BYTES that isn't UTF-8)."""
    if datatype == "BYTES":
        try:
            return [b.decode("utf-8") for b in _bytes_elements(array)]
        except UnicodeDecodeError:
            return None
    if _has_nonfinite(array):
        # NaN/Infinity are not JSON: such a tensor goes binary (IEEE bits, exact),
        # never as a bare NaN token that JSON parsers reject.
        return None
    flat: list[Any] = array.reshape(-1).tolist()
    return flat


def _encode_tensors(
    key: str, tensors: Iterable[tuple[str, np.ndarray, bool]], extra: Mapping[str, Any]
) -> tuple[bytes, int | None]:
    """Build the JSON header + binary tail; ``extra`` are the other top-level fields."""
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, array, binary in tensors:
        datatype = datatype_of(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        data = None if binary else _tensor_json_data(array, datatype)
        if data is None:
            # Non-UTF-8 BYTES cannot be a JSON string: send them binary (Triton would fail).
            raw = _tensor_binary(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = data
        entries.append(entry)
    doc: dict[str, Any] = dict(extra)
    doc[key] = entries
    header = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def encode_infer_response(
    outputs: Mapping[str, np.ndarray],
    *,
    model_name: str,
    model_version: str | None = None,
    request_id: str | None = None,
    request: InferRequest | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Encode a response; returns (body, header length or None when all JSON).

    With ``request`` given, outputs follow its requested names (in its order) and each
    one's binary choice; otherwise every output is sent as JSON.
    """
    names = request.output_names() if request is not None else None
    if names is None:
        names = list(outputs)
    missing = [n for n in names if n not in outputs]
    if missing:
        raise BackendError(f"model did not return output(s) {', '.join(missing)}")
    extra: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        extra["model_version"] = model_version
    if request_id is not None:
        extra["id"] = request_id
    if parameters:
        extra["parameters"] = dict(parameters)
    return _encode_tensors(
        "outputs",
        ((n, np.asarray(outputs[n]), request.wants_binary(n) if request else False) for n in names),
        extra,
    )


def encode_infer_request(
    inputs: Mapping[str, np.ndarray],
    *,
    outputs: Sequence[str] | None = None,
    request_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    binary: bool = True,
    binary_outputs: bool = True,
) -> tuple[bytes, int | None]:
    """Encode a request for an upstream V2 server; returns (body, header length or None)."""
    params = dict(parameters or {})
    extra: dict[str, Any] = {}
    if request_id is not None:
        extra["id"] = request_id
    if outputs is not None:
        extra["outputs"] = [
            {"name": n, "parameters": {"binary_data": binary_outputs}} for n in outputs
        ]
    elif binary_outputs:
        params["binary_data_output"] = True
    if params:
        extra["parameters"] = params
    return _encode_tensors(
        "inputs",
        ((n, np.asarray(a), binary) for n, a in inputs.items()),
        extra,
    )


def decode_infer_response(
    body: bytes | bytearray | memoryview, header_length: str | int | None = None
) -> InferResponse:
    """Decode an upstream's infer response; faults raise BackendError."""
    try:
        doc, binary = _split_body(body, header_length, "response JSON")
        if "outputs" not in doc:
            raise _Fault("response has no 'outputs'")
        outputs = _decode_tensors(doc["outputs"], binary, "output")
        params = doc.get("parameters") or {}
        if not isinstance(params, dict):
            raise _Fault("'parameters' must be an object")
        version = doc.get("model_version")
        return InferResponse(
            model_name=str(doc.get("model_name") or ""),
            model_version=None if version is None else str(version),
            id=_optional_id(doc.get("id")),
            outputs=outputs,
            parameters=params,
        )
    except _Fault as exc:
        raise BackendError(f"malformed V2 response: {exc}") from None


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode("utf-8")


def metadata_to_dict(metadata: ModelMetadata, name: str | None = None) -> dict[str, Any]:
    return {
        "name": name or metadata.name,
        "versions": list(metadata.versions),
        "platform": metadata.platform,
        "inputs": [s.to_dict() for s in metadata.inputs],
        "outputs": [s.to_dict() for s in metadata.outputs],
    }


def metadata_from_dict(doc: Any) -> ModelMetadata:
    """Parse a V2 model metadata document (``GET /v2/models/{m}``)."""

    def specs(raw: Any, what: str) -> tuple[TensorSpec, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            raise BackendError(f"model metadata: '{what}' must be a list")
        out = []
        for item in raw:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise BackendError(f"model metadata: bad {what} entry {item!r:.80}")
            shape = item.get("shape") or []
            if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
                raise BackendError(f"model metadata: bad shape in {what} {item['name']!r}")
            out.append(TensorSpec(item["name"], str(item.get("datatype", "")), tuple(shape)))
        return tuple(out)

    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        raise BackendError("model metadata: expected an object with a 'name'")
    versions = doc.get("versions") or ["1"]
    return ModelMetadata(
        name=doc["name"],
        platform=str(doc.get("platform", "")),
        inputs=specs(doc.get("inputs"), "inputs"),
        outputs=specs(doc.get("outputs"), "outputs"),
        versions=tuple(str(v) for v in versions) if isinstance(versions, list) else ("1",),
    )
