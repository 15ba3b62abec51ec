"""Check a request's tensors against a model's declared specs before a runtime sees them.

Names, datatypes and shapes are checked here so that a request's own faults come back as
:class:`~proxy.core.errors.BadRequest` with a message naming the tensor, instead of whatever
text the runtime happens to raise. A datatype that differs from the declared one is cast
only when every value survives the cast exactly (INT64 ``[1, 2]`` into an FP32 input is
fine, FP64 ``0.1`` into FP32 is not): the model must see the numbers the client sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from proxy.backends.datatypes import numpy_dtype, v2_datatype
from proxy.core.errors import BadRequest
from proxy.protocol.base import TensorSpec


def _names(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names)


def check_shape(model: str, name: str, shape: tuple[int, ...], spec: TensorSpec) -> None:
    declared = spec.shape
    if len(shape) != len(declared) or any(
        want not in (-1, got) for want, got in zip(declared, shape, strict=True)
    ):
        raise BadRequest(
            f"model {model!r}: input {name!r} has shape {list(shape)}, "
            f"expected {list(declared)} (-1: any size)"
        )


def _as_bytes_array(model: str, name: str, array: np.ndarray) -> np.ndarray:
    if array.dtype.kind in "SU":
        out = np.empty(array.shape, dtype=object)
        flat = out.reshape(-1)
        for i, item in enumerate(array.reshape(-1).tolist()):
            flat[i] = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        return out
    if array.dtype.kind != "O":
        raise BadRequest(
            f"model {model!r}: input {name!r} is BYTES, got {v2_datatype(array.dtype)}"
        )
    for item in array.reshape(-1).tolist():
        if not isinstance(item, bytes):
            raise BadRequest(
                f"model {model!r}: input {name!r} is BYTES; element of type "
                f"{type(item).__name__} is not bytes"
            )
    return array


def _exact_cast(array: np.ndarray, want: np.dtype[np.generic]) -> np.ndarray | None:
    """``array`` as ``want`` if every value is unchanged by the cast, else None."""
    if array.size == 0:
        return array.astype(want)
    src = array.dtype
    if want.kind in "iu":
        info = np.iinfo(want)  # type: ignore[type-var]
        if src.kind == "f" and not (
            np.isfinite(array).all() and bool((np.trunc(array) == array).all())
        ):
            return None
        # Integral values: the Python ints compare exactly, whatever the widths.
        if int(array.min()) < info.min or int(array.max()) > info.max:
            return None
        return array.astype(want)
    with np.errstate(all="ignore"):
        cast = array.astype(want)
        if want.kind == "f":
            # An overflow to inf cannot be trusted to read back wrong: float -> int of
            # inf is undefined (on x86 it gives INT64_MIN, which "round-trips").
            overflow = ~np.isfinite(cast) & (
                np.isfinite(array) if src.kind == "f" else np.ones(array.shape, bool)
            )
            if overflow.any():
                return None
        back = cast.astype(src)
    if np.array_equal(back, array, equal_nan=src.kind == "f"):
        return cast
    return None


def coerce_input(model: str, name: str, array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """``array`` with the datatype ``spec`` declares, or BadRequest saying why not."""
    array = np.asarray(array)
    if spec.datatype == "BYTES":
        return _as_bytes_array(model, name, array)
    want = numpy_dtype(spec.datatype)
    if array.dtype.kind in "OSU":
        raise BadRequest(f"model {model!r}: input {name!r} is {spec.datatype}, got BYTES")
    if array.dtype.newbyteorder("=") == want:
        return array if array.dtype.isnative else array.astype(want)
    # numpy calls INT64 -> FP64 "safe" although 2**53 + 1 does not survive it: for
    # integers into floats only the values can tell.
    lossless = not (array.dtype.kind in "iu" and want.kind == "f")
    if lossless and np.can_cast(array.dtype, want, casting="safe"):
        return array.astype(want)
    cast = _exact_cast(array, want)
    if cast is None:
        raise BadRequest(
            f"model {model!r}: input {name!r} is {spec.datatype}; its "
            f"{v2_datatype(array.dtype)} values do not convert exactly"
        )
    return cast


def prepare_inputs(
    model: str,
    inputs: Mapping[str, np.ndarray],
    specs: Sequence[TensorSpec],
    *,
    check_shapes: bool = True,
) -> dict[str, np.ndarray]:
    """Inputs in the model's declared order, each with its declared datatype.

    BadRequest for an unknown or missing name, a datatype that cannot be cast exactly,
    or (``check_shapes``) a rank or fixed dimension that differs from the declaration.
    """
    declared = [s.name for s in specs]
    unknown = [n for n in inputs if n not in declared]
    if unknown:
        raise BadRequest(
            f"model {model!r}: unknown input(s) {_names(unknown)}; it takes {_names(declared)}"
        )
    missing = [n for n in declared if n not in inputs]
    if missing:
        raise BadRequest(f"model {model!r}: missing input(s) {_names(missing)}")
    prepared: dict[str, np.ndarray] = {}
    for spec in specs:
        array = coerce_input(model, spec.name, inputs[spec.name], spec)
        if check_shapes:
            check_shape(model, spec.name, array.shape, spec)
        prepared[spec.name] = array
    return prepared


def select_outputs(
    model: str, requested: Sequence[str] | None, specs: Sequence[TensorSpec]
) -> list[str]:
    """The output names to compute: all declared ones, or the requested ones if known."""
    declared = [s.name for s in specs]
    if requested is None:
        return declared
    unknown = [n for n in requested if n not in declared]
    if unknown:
        raise BadRequest(
            f"model {model!r}: unknown output(s) {_names(unknown)}; it has {_names(declared)}"
        )
    return list(dict.fromkeys(requested))
