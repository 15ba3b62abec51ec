"""Real MLServer upstreams for the tests (sklearn models over V2 JSON).

MLServer pins its own dependencies, so it runs from its own virtual environment, built
once by ``scripts/mlserver_venv.sh`` (from scratch: 77 s on the quiet 2-core machine,
389 s under load) and reused when present. Each server binds HTTP, gRPC and metrics to free loopback
ports, with ``parallel_workers: 0`` (inference in the server process: light and quick
to start).

The models are trained here by the MLServer environment's own Python (its scikit-learn
writes the joblib file it will read back): a digits ``LogisticRegression`` and an
``MLPClassifier``, both on the first 1,200 digits (optionally without one class).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VERSION = "1.7.1"


class MLServerUnavailable(RuntimeError):
    """The MLServer environment could not be built or a server would not start."""


def venv_dir() -> Path:
    return Path(os.environ.get("MIRRORGATE_MLSERVER_VENV", REPO / ".cache" / "mlserver-venv"))


def ensure_venv() -> Path:
    """The MLServer venv, built by scripts/mlserver_venv.sh when missing."""
    target = venv_dir()
    if (target / f".mirrorgate-mlserver-{VERSION}").exists():
        return target
    script = REPO / "scripts" / "mlserver_venv.sh"
    done = subprocess.run(
        ["bash", str(script), str(target)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": os.environ.get("MIRRORGATE_MLSERVER_PYTHON", sys.executable)},
        timeout=900,
    )
    if done.returncode != 0:
        raise MLServerUnavailable(f"building {target} failed: {done.stderr[-2000:]}")
    return target


_TRAIN = """
import json, sys
import joblib
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
kind, out = sys.argv[1], sys.argv[2]
x, y = load_digits(return_X_y=True)
x, y = x[:1200] / 16.0, y[:1200]
if len(sys.argv) > 3:  # a class the model never sees: its predict_proba has one column fewer
    keep = y != int(sys.argv[3])
    x, y = x[keep], y[keep]
if kind == "logreg":
    model = LogisticRegression(max_iter=300)
else:
    model = MLPClassifier(hidden_layer_sizes=(32,), max_iter=300, random_state=0)
model.fit(x, y)
joblib.dump(model, out)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_model(
    venv: Path, folder: Path, *, name: str, version: str, kind: str, without: int | None = None
) -> None:
    """A model folder MLServer loads: ``model.joblib`` and ``model-settings.json``.

    ``without``: a digit class left out of training (the model then knows 9 classes).
    """
    folder.mkdir(parents=True, exist_ok=True)
    extra = [] if without is None else [str(without)]
    subprocess.run(
        [str(venv / "bin" / "python"), "-c", _TRAIN, kind, str(folder / "model.joblib"), *extra],
        check=True,
        capture_output=True,
        timeout=300,
    )
    settings = {
        "name": name,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": version},
    }
    (folder / "model-settings.json").write_text(json.dumps(settings))


class MLServer:
    """One ``mlserver start`` process serving a folder of models on loopback."""

    def __init__(self, venv: Path, root: Path) -> None:
        self.venv = venv
        self.root = root
        self.http_port = free_port()
        settings = {
            "host": "127.0.0.1",
            "http_port": self.http_port,
            "grpc_port": free_port(),
            "metrics_port": free_port(),
            "parallel_workers": 0,
        }
        (root / "settings.json").write_text(json.dumps(settings))
        self.url = f"http://127.0.0.1:{self.http_port}"
        self._log = open(root / "mlserver.log", "wb")
        self.process = subprocess.Popen(
            [str(venv / "bin" / "mlserver"), "start", str(root)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=root,
        )

    def wait_ready(self, model: str, deadline_s: float = 180.0) -> None:
        end = time.monotonic() + deadline_s
        url = f"{self.url}/v2/models/{model}/ready"
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise MLServerUnavailable(f"mlserver exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise MLServerUnavailable(f"mlserver not ready after {deadline_s:g} s: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.root / "mlserver.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._log.close()
