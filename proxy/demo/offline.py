"""Run a demo ONNX model in-process (no proxy): offline evaluation and recorded pairs.

Synchronous by design: used by the build script, the paired-record writer and tests,
never on the proxy's event loop (the proxy runs models through its own backends).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from proxy.demo.assets import INPUT_NAME, OUTPUT_NAME


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class OfflineModel:
    """One ONNX classifier: ``features`` FP32 [n, 64] -> ``probabilities`` FP32 [n, 10]."""

    def __init__(self, path: str | os.PathLike[str], *, threads: int = 1) -> None:
        self.path = Path(path)
        options = ort.SessionOptions()
        # One thread: deterministic, and polite on a shared 2-core machine.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
        )

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(features, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        (out,) = self._session.run([OUTPUT_NAME], {INPUT_NAME: x})
        return np.asarray(out)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(self.predict_proba(features).argmax(axis=1))
