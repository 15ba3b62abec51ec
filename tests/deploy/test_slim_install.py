"""The core install alone (no extras): a slim gateway that serves `http` backends.

A fresh virtual environment gets ``pip install <copy of the sources>`` with no extras,
resolved for real (from pip's cache after the first run): no onnxruntime, torch, psycopg
or pyarrow. From it, ``mirrorgate serve`` runs in front of a V2 upstream on loopback and
records pairs in SQLite, then ``replay`` runs over the pairs it wrote, ``rollouts list``
finds the rollout and ``report`` writes its pack. An onnx backend is refused before
start with the extra to install.

Slow: the install resolves numpy, scipy, SQLAlchemy, aiohttp, ... like a user's would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.deploy.v2_upstream import PROBS, running_upstream

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
MISSING = ("onnxruntime", "torch", "psycopg", "pyarrow")


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slim")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("proxy", "gates", "storage"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    env_dir = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    result = subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", str(src)],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return env_dir


def _env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MIRRORGATE_", "PYTHONPATH", "VIRTUAL_ENV"))
    }


def _cli(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "mirrorgate"), *args],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=cwd,
        timeout=300,
    )


def test_core_install_has_no_optional_runtime(venv: Path) -> None:
    probe = f"import importlib.util as u; print([m for m in {MISSING!r} if u.find_spec(m)])"
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe],
        capture_output=True, text=True, check=True, env=_env(), cwd="/",
    )  # fmt: skip
    assert out.stdout.strip() == "[]"


def _infer(base: str, i: int) -> dict:
    body = {
        "id": f"slim-{i}",
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [0.1, 0.2, 0.3, i]}
        ],
    }
    request = urllib.request.Request(
        f"{base}/v2/models/classifier/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Mirrorgate-Slice-platform": "web"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _wait_ready(base: str) -> None:
    """Listening comes before the backends are ready: poll readiness (bounded, not timed)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=10) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, "serve never became ready"
        time.sleep(0.2)


def test_serve_replay_rollouts_report(venv: Path, tmp_path: Path) -> None:
    with running_upstream() as upstream:
        config = {
            "server": {"host": "127.0.0.1", "port": 0, "model_name": "classifier"},
            "models": {
                "champion": {"name": "champion", "kind": "http", "url": upstream,
                             "model": "classifier"},
                "candidate": {"name": "candidate", "kind": "http", "url": upstream,
                              "model": "classifier-candidate"},
            },
            "slices": {"headers": ["platform"]},
            "storage": {"url": f"sqlite:///{tmp_path / 'slim.sqlite'}", "flush_interval_ms": 50},
        }  # fmt: skip
        cfg = tmp_path / "mirrorgate.yaml"
        cfg.write_text(yaml.safe_dump(config))
        pairs = tmp_path / "pairs.jsonl"
        proc = subprocess.Popen(
            [str(venv / "bin" / "mirrorgate"), "serve", "--config", str(cfg),
             "--pairs-out", str(pairs)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=tmp_path,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode()
            assert line.startswith("mirrorgate: listening on "), proc.stderr.read().decode()
            base = line.split()[-1]
            _wait_ready(base)
            for i in range(20):
                outputs = _infer(base, i)["outputs"]
                assert outputs[0]["data"] == pytest.approx(PROBS["classifier"])
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(120) == 0, proc.stderr.read().decode() if proc.stderr else ""
    # every mirrored pair is in the file once the drained server has flushed its sinks
    deadline = time.monotonic() + 60
    while len(pairs.read_text().splitlines()) < 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(pairs.read_text().splitlines()) == 20

    replay = _cli(venv, "replay", "--pairs", str(pairs), "--json", cwd=tmp_path)
    assert replay.returncode in (0, 1), replay.stderr
    assert json.loads(replay.stdout)["verdict"] in ("continue", "promote", "abort")

    listed = _cli(venv, "rollouts", "list", "--config", str(cfg), "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert len(rows) == 1 and rows[0]["pairs"] == 20 and rows[0]["candidate"] == "candidate"

    out = tmp_path / "pack"
    report = _cli(
        venv, "report", "--rollout", rows[0]["id"], "--config", str(cfg), "--out", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert json.loads((out / "report.json").read_text())["rollout"]["id"] == rows[0]["id"]


def test_onnx_backend_names_the_extra(venv: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not really a model")
    cfg = tmp_path / "onnx.yaml"
    cfg.write_text(
        yaml.safe_dump({"models": {"champion": {"name": "c", "kind": "onnx", "path": str(model)}}})
    )
    result = _cli(venv, "serve", "--config", str(cfg), cwd=tmp_path)
    assert result.returncode == 2
    assert "models.champion.kind: onnx needs onnxruntime" in result.stderr
    assert "pip install 'mirrorgate[onnx]'" in result.stderr
