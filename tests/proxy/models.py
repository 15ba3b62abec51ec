"""Real models built by the tests, with numpy oracles. Other areas' tests import these.

Every classifier here is the same function: ``probs = softmax(x @ weight + bias)`` and
``label = argmax(probs)``, with input ``x`` (FP32 ``[-1, n_features]``) and outputs
``probs`` (FP32 ``[-1, n_classes]``) and ``label`` (INT64 ``[-1]``), whatever the runtime.
torch is imported only by the torch builders (it is an optional extra).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT = "x"
PROBS = "probs"
LABEL = "label"
OPSET = 17

V2_TO_ONNX = {
    "BOOL": TensorProto.BOOL,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


@dataclass(frozen=True)
class ClassifierWeights:
    weight: np.ndarray  # (n_features, n_classes), float32
    bias: np.ndarray  # (n_classes,), float32

    @property
    def n_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.weight.shape[1])

    def probs(self, x: np.ndarray) -> np.ndarray:
        """The numpy oracle, in float64."""
        logits = np.asarray(x, np.float64) @ self.weight.astype(np.float64) + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def labels(self, x: np.ndarray) -> np.ndarray:
        return self.probs(x).argmax(axis=1).astype(np.int64)

    def sample(self, rows: int, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).normal(size=(rows, self.n_features)).astype(np.float32)


def classifier_weights(n_features: int = 4, n_classes: int = 3, seed: int = 0) -> ClassifierWeights:
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(n_features, n_classes)).astype(np.float32)
    bias = rng.normal(size=(n_classes,)).astype(np.float32)
    return ClassifierWeights(weight, bias)


def classifier_io(n_features: int, n_classes: int) -> dict[str, Any]:
    """The classifier's V2 signature in the torch io-declaration format."""
    return {
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, n_features]}],
        "outputs": [
            {"name": PROBS, "datatype": "FP32", "shape": [-1, n_classes]},
            {"name": LABEL, "datatype": "INT64", "shape": [-1]},
        ],
    }


def _save(graph: onnx.GraphProto, path: str | Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def build_onnx_classifier(
    path: str | Path, n_features: int = 4, n_classes: int = 3, seed: int = 0
) -> ClassifierWeights:
    weights = classifier_weights(n_features, n_classes, seed)
    nodes = [
        helper.make_node("MatMul", [INPUT, "W"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [PROBS], axis=1),
        helper.make_node("ArgMax", [PROBS], [LABEL], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", n_features])],
        [
            helper.make_tensor_value_info(PROBS, TensorProto.FLOAT, ["batch", n_classes]),
            helper.make_tensor_value_info(LABEL, TensorProto.INT64, ["batch"]),
        ],
        initializer=[
            numpy_helper.from_array(weights.weight, "W"),
            numpy_helper.from_array(weights.bias, "b"),
        ],
    )
    _save(graph, path)
    return weights


def build_onnx_mlp(
    path: str | Path, n_features: int, hidden: int, n_classes: int, seed: int = 0
) -> list[np.ndarray]:
    """A two-layer ReLU MLP ending in softmax (``x`` -> ``probs``), for benchmarks.

    Returns ``[w1, b1, w2, b2]`` (float32) for a numpy oracle."""
    rng = np.random.default_rng(seed)
    params = [
        (rng.normal(size=(n_features, hidden)) / np.sqrt(n_features)).astype(np.float32),
        rng.normal(size=(hidden,)).astype(np.float32) * 0.1,
        (rng.normal(size=(hidden, n_classes)) / np.sqrt(hidden)).astype(np.float32),
        rng.normal(size=(n_classes,)).astype(np.float32) * 0.1,
    ]
    nodes = [
        helper.make_node("MatMul", [INPUT, "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["l0"]),
        helper.make_node("Add", ["l0", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [PROBS], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", n_features])],
        [helper.make_tensor_value_info(PROBS, TensorProto.FLOAT, ["batch", n_classes])],
        initializer=[
            numpy_helper.from_array(p, n)
            for p, n in zip(params, ["w1", "b1", "w2", "b2"], strict=True)
        ],
    )
    _save(graph, path)
    return params


def mlp_oracle(params: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    w1, b1, w2, b2 = (p.astype(np.float64) for p in params)
    logits = np.maximum(np.asarray(x, np.float64) @ w1 + b1, 0.0) @ w2 + b2
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def build_onnx_identity(
    path: str | Path, datatype: str, shape: tuple[int | str, ...] = ("batch", 3)
) -> None:
    """``x`` -> ``y`` unchanged, both of V2 ``datatype``."""
    tp = V2_TO_ONNX[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("x", tp, list(shape))],
        [helper.make_tensor_value_info("y", tp, list(shape))],
    )
    _save(graph, path)


def build_onnx_cast(path: str | Path, source: str, target: str) -> None:
    """``x`` (``source``) -> ``y`` = cast to ``target``, shape ``[batch, 3]``."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=V2_TO_ONNX[target])],
        f"cast_{source.lower()}_{target.lower()}",
        [helper.make_tensor_value_info("x", V2_TO_ONNX[source], ["batch", 3])],
        [helper.make_tensor_value_info("y", V2_TO_ONNX[target], ["batch", 3])],
    )
    _save(graph, path)


def build_onnx_lookup(path: str | Path, table: np.ndarray) -> None:
    """``ids`` (INT64 ``[batch, 1]``) -> ``rows`` = table[ids] (FP32 ``[batch, 1, d]``).

    An id outside the table makes onnxruntime fail at run time: a fault of one request's
    values that no shape or dtype check can see."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 1])],
        [
            helper.make_tensor_value_info(
                "rows", TensorProto.FLOAT, ["batch", 1, int(table.shape[1])]
            )
        ],
        initializer=[numpy_helper.from_array(table.astype(np.float32), "table")],
    )
    _save(graph, path)


def build_onnx_batch_sum(path: str | Path, n_features: int = 3) -> None:
    """``x`` [batch, n] -> ``total`` [n]: sums over the batch axis, so it cannot batch."""
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=0)],
        "batch_sum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_features])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [n_features])],
        initializer=[axes],
    )
    _save(graph, path)


def build_onnx_fixed_batch(path: str | Path, n_features: int = 3) -> None:
    """Identity on FP32 ``[1, n]``: a model exported with a fixed batch dimension."""
    build_onnx_identity(path, "FP32", (1, n_features))


def write_torch_io(model_path: str | Path, io: dict[str, Any]) -> Path:
    """Write the torch io declaration next to a model file (``model.io.json``)."""
    sidecar = Path(model_path).with_suffix(".io.json")
    sidecar.write_text(json.dumps(io))
    return sidecar


def build_torchscript_classifier(
    path: str | Path,
    n_features: int = 4,
    n_classes: int = 3,
    seed: int = 0,
    *,
    declare_io: bool = True,
) -> ClassifierWeights:
    import torch

    from tests.proxy.torch_models import TorchClassifier

    weights = classifier_weights(n_features, n_classes, seed)
    module = TorchClassifier(weights.weight, weights.bias).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated
        torch.jit.save(torch.jit.script(module), str(path))
    if declare_io:
        write_torch_io(path, classifier_io(n_features, n_classes))
    return weights


def build_torch_export_classifier(
    path: str | Path,
    n_features: int = 4,
    n_classes: int = 3,
    seed: int = 0,
    *,
    declare_io: bool = True,
) -> ClassifierWeights:
    """A ``torch.export`` program (``.pt2``) with a dynamic batch dimension."""
    import torch

    from tests.proxy.torch_models import TorchClassifier

    weights = classifier_weights(n_features, n_classes, seed)
    module = TorchClassifier(weights.weight, weights.bias).eval()
    example = (torch.zeros(2, n_features),)
    program = torch.export.export(
        module, example, dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
    )
    torch.export.save(program, str(path))
    if declare_io:
        write_torch_io(path, classifier_io(n_features, n_classes))
    return weights


def build_torch_state_dict(
    path: str | Path, n_features: int = 4, n_classes: int = 3, seed: int = 0
) -> ClassifierWeights:
    """Weights for ``tests.proxy.torch_models:make_classifier`` as a state_dict file."""
    import torch

    from tests.proxy.torch_models import TorchClassifier

    weights = classifier_weights(n_features, n_classes, seed)
    torch.save(TorchClassifier(weights.weight, weights.bias).state_dict(), str(path))
    return weights


def build_torchscript_identity(
    path: str | Path, datatype: str, shape: tuple[int, ...] = (-1, 3)
) -> None:
    """TorchScript ``x`` -> ``y`` unchanged, declared as V2 ``datatype`` (not BYTES)."""
    import torch

    from tests.proxy.torch_models import Identity

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(Identity()), str(path))
    spec = {"datatype": datatype, "shape": list(shape)}
    write_torch_io(path, {"inputs": [{"name": "x", **spec}], "outputs": [{"name": "y", **spec}]})
