"""Which tensors a torch model takes and returns, since torch modules do not declare them.

Sources, first match wins (docs/backends.md has the user-facing version):

1. **Declared**: a sidecar file next to the model, ``model.pt`` -> ``model.io.json``, or,
   for a ``module:factory`` model, a ``mirrorgate_io`` attribute on the returned module,
   both in the V2 metadata shape::

       {"inputs":  [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 3]}]}

   Inputs are passed positionally in the declared order; returned tensors are named in
   the declared order (a returned dict is named by its keys). Datatypes and shapes are
   enforced on requests.
2. **torch.export programs** carry their own signature: input names, dtypes and shapes
   (dynamic dimensions -> -1) come from the program, outputs are ``output__0``,
   ``output__1``, ... (Triton's PyTorch-backend convention) with the program's dtypes.
3. **Convention** (TorchScript or module without a declaration): input names from the
   ``forward`` signature, outputs ``output__<i>``; datatype FP32 (enforced: requests are
   cast exactly or refused), shape ``[-1, -1]`` as a placeholder that is *not* enforced.
   Models taking other dtypes or ranks need a declaration.

This module never imports torch: the objects it reads are passed in.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from proxy.backends.datatypes import DATATYPES
from proxy.core.errors import ConfigError
from proxy.protocol.base import TensorSpec

SIDECAR_SUFFIX = ".io.json"
MODULE_ATTRIBUTE = "mirrorgate_io"
PLACEHOLDER_SHAPE = (-1, -1)


@dataclass(frozen=True, slots=True)
class TorchIO:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    source: str  # sidecar | attribute | export | convention
    check_shapes: bool  # shapes are real declarations, not placeholders
    outputs_known: bool  # output names (and count) are fixed before a run


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1)
    datatype: str
    shape: list[int]

    @field_validator("datatype")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in DATATYPES:
            raise ValueError(f"unknown datatype {value!r} (known: {', '.join(DATATYPES)})")
        if value == "BYTES":
            raise ValueError("torch tensors cannot hold BYTES")
        return value

    @field_validator("shape")
    @classmethod
    def _dims(cls, value: list[int]) -> list[int]:
        if any(d < -1 for d in value):
            raise ValueError("dimensions are sizes >= 0, or -1 for any size")
        return value


class _Declaration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: list[_Spec] = Field(..., min_length=1)
    outputs: list[_Spec] = Field(..., min_length=1)


def sidecar_path(model_path: Path) -> Path:
    return model_path.with_suffix(SIDECAR_SUFFIX)


def _declared(data: Any, source: str, where: str) -> TorchIO:
    try:
        decl = _Declaration.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: "
            f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(f"torch io declaration {where}: {problems}") from exc
    for group in (decl.inputs, decl.outputs):
        names = [s.name for s in group]
        if len(set(names)) != len(names):
            raise ConfigError(f"torch io declaration {where}: duplicate names {names}")
    return TorchIO(
        inputs=tuple(TensorSpec(s.name, s.datatype, tuple(s.shape)) for s in decl.inputs),
        outputs=tuple(TensorSpec(s.name, s.datatype, tuple(s.shape)) for s in decl.outputs),
        source=source,
        check_shapes=True,
        outputs_known=True,
    )


def read_sidecar(model_path: Path) -> TorchIO | None:
    path = sidecar_path(model_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"torch io declaration {str(path)!r} is not readable JSON: {exc}"
        ) from exc
    return _declared(data, "sidecar", repr(str(path)))


def from_attribute(module: object, factory: str) -> TorchIO | None:
    data = getattr(module, MODULE_ATTRIBUTE, None)
    if data is None:
        return None
    return _declared(data, "attribute", f"{factory} .{MODULE_ATTRIBUTE}")


def _convention(input_names: list[str], n_outputs: int | None) -> TorchIO:
    return TorchIO(
        inputs=tuple(TensorSpec(n, "FP32", PLACEHOLDER_SHAPE) for n in input_names),
        outputs=tuple(
            TensorSpec(f"output__{i}", "FP32", PLACEHOLDER_SHAPE) for i in range(n_outputs or 1)
        ),
        source="convention",
        check_shapes=False,
        outputs_known=n_outputs is not None,
    )


def from_script_schema(script_module: Any) -> TorchIO:
    """Convention specs from a TorchScript ``forward`` schema (names and output count)."""
    schema = script_module.forward.schema
    names = [a.name for a in schema.arguments[1:]]  # [0] is self
    returns = schema.returns
    n_outputs: int | None = None
    if len(returns) == 1:
        kind = str(returns[0].type)
        if kind == "Tensor":
            n_outputs = 1
        elif kind.startswith("Tuple[") and "Tensor" in kind:
            n_outputs = len(returns[0].type.elements())
    return _convention(names, n_outputs)


def from_signature(module: Any) -> TorchIO:
    """Convention specs from a Python module's ``forward`` parameters."""
    params = inspect.signature(module.forward).parameters.values()
    names = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    if not names:
        names = ["input__0"]
    return _convention(names, None)


def from_export(program: Any, torch_to_v2: dict[Any, str], where: str) -> TorchIO:
    """Specs read from a torch.export program's graph signature and fake tensors."""
    user_inputs = list(program.graph_signature.user_inputs)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    output_node = next(n for n in program.graph.nodes if n.op == "output")

    def spec(name: str, val: Any, role: str) -> TensorSpec:
        dtype = getattr(val, "dtype", None)
        if dtype not in torch_to_v2:
            raise ConfigError(
                f"torch.export program {where}: {role} {name!r} is not a tensor of a V2 "
                f"datatype ({dtype}); declare it in {SIDECAR_SUFFIX} or re-export"
            )
        shape = tuple(d if isinstance(d, int) else -1 for d in val.shape)
        return TensorSpec(name, torch_to_v2[dtype], shape)

    inputs = tuple(spec(n, placeholders[n].meta.get("val"), "input") for n in user_inputs)
    # The output node also returns mutated buffers; the signature names the user's.
    returned = {getattr(a, "name", None): a for a in output_node.args[0]}
    outputs = tuple(
        spec(f"output__{i}", getattr(returned.get(name), "meta", {}).get("val"), "output")
        for i, name in enumerate(program.graph_signature.user_outputs)
    )
    if not outputs:
        raise ConfigError(f"torch.export program {where} returns no tensors")
    return TorchIO(inputs, outputs, "export", check_shapes=True, outputs_known=True)


def check_arity(io: TorchIO, expected_inputs: int | None, where: str) -> None:
    """A declaration must give the model as many inputs as its ``forward`` takes."""
    if expected_inputs is not None and len(io.inputs) != expected_inputs:
        raise ConfigError(
            f"{where}: {len(io.inputs)} inputs declared, the model takes {expected_inputs}"
        )
