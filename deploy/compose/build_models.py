"""Writes the two tiny Triton model repositories that deploy/compose.yaml serves.

    python deploy/compose/build_models.py

champion/ and candidate/ each hold ``classifier``: a 4-feature, 2-class logistic model
(ONNX Gemm + Softmax) with a config.pbtxt for Triton's ONNX Runtime backend and dynamic
batching. The candidate's weights differ a little, so mirrorgate's gates see real
disagreement. The output is deterministic; tests/deploy/test_compose.py checks that the
committed files are exactly what this script writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
MODEL = "classifier"
INPUT, OUTPUT = "INPUT0", "probabilities"
FEATURES, CLASSES = 4, 2
WEIGHTS = {
    "champion": ([[0.8, -0.8], [-0.5, 0.5], [0.3, -0.3], [-0.1, 0.1]], [0.05, -0.05]),
    "candidate": ([[0.9, -0.9], [-0.4, 0.4], [0.3, -0.3], [-0.2, 0.2]], [0.0, 0.0]),
}
CONFIG = f"""name: "{MODEL}"
backend: "onnxruntime"
max_batch_size: 64
input [
  {{
    name: "{INPUT}"
    data_type: TYPE_FP32
    dims: [ {FEATURES} ]
  }}
]
output [
  {{
    name: "{OUTPUT}"
    data_type: TYPE_FP32
    dims: [ {CLASSES} ]
  }}
]
dynamic_batching {{ }}
instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
"""


def build_model(weights: list[list[float]], bias: list[float]) -> bytes:
    w = numpy_helper.from_array(np.asarray(weights, dtype=np.float32), "W")
    b = numpy_helper.from_array(np.asarray(bias, dtype=np.float32), "B")
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", [INPUT, "W", "B"], ["logits"]),
            helper.make_node("Softmax", ["logits"], [OUTPUT], axis=1),
        ],
        MODEL,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[w, b],
    )
    # opset 13 and IR 7: loadable by every Triton/onnxruntime release of the last years
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="mirrorgate"
    )
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write(root: Path) -> list[Path]:
    written = []
    for role, (weights, bias) in WEIGHTS.items():
        folder = root / role / MODEL
        (folder / "1").mkdir(parents=True, exist_ok=True)
        (folder / "1" / "model.onnx").write_bytes(build_model(weights, bias))
        (folder / "config.pbtxt").write_text(CONFIG)
        written += [folder / "1" / "model.onnx", folder / "config.pbtxt"]
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "models"
    for path in write(target):
        print(path)
