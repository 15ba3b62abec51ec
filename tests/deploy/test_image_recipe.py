"""The container image's own recipe, replayed in a clean virtual environment.

install.sh builds a fresh venv from a copy of the sources (as the Dockerfile's COPY lines
lay them out), then the server starts with the runtime stage's ENTRYPOINT/CMD/ENV on the
baked config, with http backends pointing at a small V2 upstream on loopback. Torch is
left out (``MIRRORGATE_TORCH=none``, a documented build argument) so no CUDA build is
downloaded; everything else resolves normally through pip.

Slow: the install resolves the real dependencies (from pip's cache after the first run).
It needs ``mirrorgate serve`` and the control API; until those land, it fails at start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.core.config import load_config
from tests.deploy.agreed_metrics import AGREED
from tests.deploy.controllers import (
    VERDICTS,
    Live,
    call_webhook,
    mirrorgate_webhook,
    run_template,
)
from tests.deploy.helpers import run_tool
from tests.deploy.image_replay import BASE_PATH, ImageRoot, build
from tests.deploy.v2_upstream import PROBS, running_upstream

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

TOKEN = "recipe-test-token"
READY_WAIT_S = 180.0


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base_url: str
    env: dict[str, str]
    log: Path
    image: ImageRoot
    model_name: str

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.base_url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def post_json(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        data = json.dumps(body).encode()
        request = urllib.request.Request(
            self.base_url + path, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status), json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> ImageRoot:
    root = tmp_path_factory.mktemp("image-root")
    log = tmp_path_factory.mktemp("logs") / "build.log"
    build_args = {"MIRRORGATE_TORCH": "none", "PYTHON": sys.executable}
    image = build(root, "runtime", build_args, log)
    assert (image.path("/opt/mirrorgate/bin/mirrorgate")).is_file()
    return image


def test_image_venv_is_a_regular_install_without_torch(image: ImageRoot) -> None:
    python = image.path("/opt/mirrorgate/bin/python")
    probe = (
        "import importlib.util as u, proxy, pathlib;"
        "print(pathlib.Path(proxy.__file__).resolve());"
        "print(u.find_spec('torch') is None, u.find_spec('onnxruntime') is not None)"
    )
    out = subprocess.run(
        [str(python), "-c", probe], capture_output=True, text=True, check=True, cwd="/"
    )
    location, flags = out.stdout.splitlines()
    # not an editable install pointing back into the source tree
    assert location.startswith(str(image.path("/opt/mirrorgate/lib")))
    assert flags == "True True"


@pytest.fixture(scope="module")
def server(image: ImageRoot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    df = image.dockerfile
    cfg = df.config("runtime")
    assert cfg.workdir is not None
    workdir = image.path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    baked = load_config(image.path("/etc/mirrorgate/mirrorgate.yaml"), env={})
    log = tmp_path_factory.mktemp("logs") / "server.log"
    port = _free_port()
    with running_upstream() as upstream:
        env = {k: image.map(v) for k, v in cfg.env.items()}
        env["PATH"] = env["PATH"].replace("$PATH", BASE_PATH)
        env["HOME"] = str(workdir)
        env.update(
            {
                # the only changes to the image's own settings: loopback, a free port,
                # the upstream's address and a throwaway database
                "MIRRORGATE_SERVER__HOST": "127.0.0.1",
                "MIRRORGATE_SERVER__PORT": str(port),
                "MIRRORGATE_SERVER__CONTROL_TOKEN": TOKEN,
                "MIRRORGATE_MODELS__CHAMPION__URL": upstream,
                "MIRRORGATE_MODELS__CHAMPION__MODEL": "classifier",
                "MIRRORGATE_MODELS__CANDIDATE__URL": upstream,
                "MIRRORGATE_MODELS__CANDIDATE__MODEL": "classifier-candidate",
                "MIRRORGATE_STORAGE__URL": f"sqlite:///{workdir / 'recipe.sqlite'}",
            }
        )
        argv = [image.map(a) for a in cfg.entrypoint + cfg.cmd]
        resolved = shutil.which(argv[0], path=env["PATH"])
        assert resolved and resolved.startswith(str(image.root)), argv[0]
        argv[0] = resolved
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        srv = Server(proc, f"http://127.0.0.1:{port}", env, log, image, baked.server.model_name)
        try:
            deadline = time.monotonic() + READY_WAIT_S
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"mirrorgate exited with {proc.returncode}:\n{srv.log_tail()}")
                try:
                    status, _ = srv.get("/v2/health/ready")
                except OSError:
                    status = 0
                if status == 200:
                    break
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"not ready after {READY_WAIT_S}s (last status {status}):\n{srv.log_tail()}"
                    )
                time.sleep(0.5)
            yield srv
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def test_ready_and_live(server: Server) -> None:
    assert server.get("/v2/health/ready")[0] == 200
    assert server.get("/v2/health/live")[0] == 200


def test_image_healthcheck_passes_against_the_running_server(server: Server) -> None:
    cfg = server.image.dockerfile.config("runtime")
    assert cfg.healthcheck is not None
    argv = [server.image.map(a) for a in cfg.healthcheck]
    result = subprocess.run(
        argv, env=server.env, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr


def test_inference_through_the_image_answers_with_the_champion(server: Server) -> None:
    body = {
        "id": "recipe-1",
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [0.1, 0.2, 0.3, 0.4]}
        ],
    }
    status, response = server.post_json(f"/v2/models/{server.model_name}/infer", body)
    assert status == 200, response
    assert response["id"] == "recipe-1"
    outputs = {o["name"]: o for o in response["outputs"]}
    assert outputs["probabilities"]["data"] == pytest.approx(PROBS["classifier"])


def test_live_metrics_pass_promtool(server: Server, promtool: str) -> None:
    status, text = server.get("/metrics")
    assert status == 200
    result = run_tool([promtool, "check", "metrics"], input=text.decode())
    assert result.returncode == 0, result.stdout + result.stderr
    # Every agreed metric the rules and dashboards read is exported, with its type: a
    # renamed metric breaks here, not silently in a dashboard. (The batcher's exists only
    # with in-process micro-batching; this deployment's models are remote.)
    types = {f.name: f.type for f in text_string_to_metric_families(text.decode())}
    for agreed in AGREED:
        if agreed.name == "mirrorgate_batcher_batch_size":
            continue
        family = agreed.name.removesuffix("_total") if agreed.kind == "counter" else agreed.name
        assert types.get(family) == agreed.kind, agreed.name


def test_control_api_answers_argo_rollouts_and_flagger(server: Server) -> None:
    """deploy/argo-rollouts and deploy/flagger drive the real lifecycle endpoints."""
    live = Live(server.base_url, {"read-token": TOKEN, "write-token": TOKEN})
    revision = "recipe0001"
    assert run_template("mirrorgate-start", live, {"revision": revision}) == ["Successful"]
    status, body = server.get(
        f"/v1/rollout/verdict?revision={revision}", {"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200, body
    verdict = json.loads(body)["verdict"]
    assert verdict in VERDICTS and json.loads(body)["revision"] == revision
    expected = {"promote": "Successful", "abort": "Failed", "continue": "Inconclusive"}[verdict]
    assert run_template("mirrorgate-verdict", live, {"revision": revision}) == [expected]
    wrong = Live(server.base_url, {"read-token": "wrong", "write-token": "wrong"})
    assert run_template("mirrorgate-verdict", wrong, {"revision": revision}) == ["Error"]
    # another revision's verdict is refused, never this one's
    assert run_template("mirrorgate-verdict", live, {"revision": "other"}) == ["Error"]
    stage_phase = run_template(
        "mirrorgate-stage", live, {"revision": revision, "stages-after": "'canary-25'"}
    )
    assert stage_phase in (["Inconclusive"], ["Successful"])
    status_code = call_webhook(mirrorgate_webhook("rollout"), live, revision, "Progressing")
    assert (status_code == 200) == (verdict != "abort")


def test_sigterm_drains_and_exits_cleanly(server: Server) -> None:
    """Last in this module: the orchestrator's stop signal ends the server with status 0."""
    server.proc.send_signal(signal.SIGTERM)
    baked = load_config(server.image.path("/etc/mirrorgate/mirrorgate.yaml"), env={})
    # generous bound for a loaded CI machine; the test is about the exit status, not speed
    returncode = server.proc.wait(baked.server.shutdown_timeout_s + 60)
    assert returncode == 0, server.log_tail()
    with pytest.raises(OSError):
        server.get("/v2/health/ready")


def test_pip_check_is_clean(image: ImageRoot) -> None:
    python = image.path("/opt/mirrorgate/bin/python")
    result = subprocess.run(
        [str(python), "-m", "pip", "check"],
        capture_output=True,
        text=True,
        env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
