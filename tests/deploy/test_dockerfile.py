"""The Dockerfile, its .dockerignore and the scripts it runs (no Docker engine needed)."""

from __future__ import annotations

import fnmatch
import http.server
import importlib.util
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.core.config import load_config
from tests.deploy.dockerfile import Dockerfile, parse
from tests.deploy.helpers import REPO, require_tool, run_tool

DOCKERFILE = REPO / "Dockerfile"
INSTALL = REPO / "deploy" / "docker" / "install.sh"
HEALTHCHECK = REPO / "deploy" / "docker" / "healthcheck.py"
IMAGE_CONFIG_PATH = "/etc/mirrorgate/mirrorgate.yaml"


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse(DOCKERFILE)


def test_hadolint_passes() -> None:
    hadolint = require_tool("hadolint")
    result = run_tool([hadolint, "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_passes_on_install_script() -> None:
    shellcheck = require_tool("shellcheck")
    result = run_tool([shellcheck, str(INSTALL)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_target_is_the_cpu_runtime(dockerfile: Dockerfile) -> None:
    assert dockerfile.default_target.name == "runtime"
    copies = [i.copy_parts() for i in dockerfile.stage("runtime").all("COPY")]
    assert ("build-cpu", ["/opt/mirrorgate"], "/opt/mirrorgate") in copies


@pytest.mark.parametrize("target", ["runtime", "gateway", "cuda", "flagger-loadtester"])
def test_images_run_as_a_numeric_non_root_user(dockerfile: Dockerfile, target: str) -> None:
    user = dockerfile.config(target).user
    assert user is not None
    uid, _, gid = user.partition(":")
    # Kubernetes' runAsNonRoot can only verify a numeric uid.
    assert uid.isdigit() and int(uid) != 0
    assert not gid or (gid.isdigit() and int(gid) != 0)
    # ...and deploy/kubernetes runs the pod as that same uid.
    deployment = (REPO / "deploy" / "kubernetes" / "deployment.yaml").read_text()
    assert f"runAsUser: {uid}" in deployment


def test_runtime_starts_mirrorgate_serve_on_the_baked_config(dockerfile: Dockerfile) -> None:
    cfg = dockerfile.config("runtime")
    assert cfg.entrypoint + cfg.cmd == ["mirrorgate", "serve", "--config", IMAGE_CONFIG_PATH]
    assert cfg.env["PATH"].split(":")[0] == "/opt/mirrorgate/bin"
    assert cfg.stopsignal == "SIGTERM"
    baked = [
        c.copy_parts()
        for c in dockerfile.stage("runtime-base").all("COPY")
        if c.copy_parts()[0] is None
    ]
    sources = {dest: srcs for _, srcs, dest in baked}
    assert sources[IMAGE_CONFIG_PATH] == ["deploy/docker/mirrorgate.yaml"]
    config = load_config(REPO / "deploy" / "docker" / "mirrorgate.yaml", env={})
    # inside a container the server must listen beyond loopback
    assert config.server.host == "0.0.0.0"
    assert cfg.expose == [str(config.server.port)]


def test_healthcheck_probes_readiness_on_the_configured_port(dockerfile: Dockerfile) -> None:
    cfg = dockerfile.config("runtime")
    assert cfg.healthcheck == ["python", "/usr/local/lib/mirrorgate/healthcheck.py"]
    copies = {
        dest: srcs
        for _, srcs, dest in (c.copy_parts() for c in dockerfile.stage("runtime-base").all("COPY"))
    }
    assert copies["/usr/local/lib/mirrorgate/healthcheck.py"] == ["deploy/docker/healthcheck.py"]
    for option in ("interval", "timeout", "start-period", "retries"):
        assert option in cfg.healthcheck_options

    spec = importlib.util.spec_from_file_location("healthcheck", HEALTHCHECK)
    assert spec and spec.loader
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    port = load_config(REPO / "deploy" / "docker" / "mirrorgate.yaml", env={}).server.port
    assert healthcheck.ready_url({}) == f"http://127.0.0.1:{port}/v2/health/ready"
    assert healthcheck.ready_url({"MIRRORGATE_SERVER__PORT": "9001"}).endswith(
        ":9001/v2/health/ready"
    )


def test_build_stages_only_run_install_sh(dockerfile: Dockerfile) -> None:
    """test_image_recipe replays the install.sh RUN; any other RUN there would go untested."""
    for name in ("source", "build-cpu", "build-gateway", "build-cuda"):
        for run in dockerfile.stage(name).all("RUN"):
            assert re.fullmatch(
                r"(\w+=\S+ )*deploy/docker/install\.sh /src /opt/mirrorgate", run.value
            ), f"stage {name}, line {run.line}: {run.value}"


def _run_env(dockerfile: Dockerfile, stage: str) -> dict[str, str]:
    """ARG defaults and inline assignments the stage's install.sh RUN sees."""
    env: dict[str, str] = {}
    for ins in dockerfile.stage(stage).instructions:
        if ins.keyword == "ARG":
            key, _, value = ins.value.partition("=")
            env[key] = value
        if ins.keyword == "RUN":
            env.update(dict(re.findall(r"(\w+)=(\S+) ", ins.value)))
    return env


def test_cpu_image_gets_cpu_builds_and_cuda_image_gpu_builds(dockerfile: Dockerfile) -> None:
    cpu = _run_env(dockerfile, "build-cpu")
    assert cpu["MIRRORGATE_TORCH"] == "cpu"
    assert cpu["MIRRORGATE_ONNXRUNTIME"] == "cpu"
    assert cpu["TORCH_INDEX_URL"].endswith("/whl/cpu")
    gpu = _run_env(dockerfile, "build-cuda")
    assert gpu["MIRRORGATE_TORCH"] == "cuda"
    assert gpu["MIRRORGATE_ONNXRUNTIME"] == "gpu"
    assert cpu["TORCH_VERSION"] == gpu["TORCH_VERSION"]
    slim = _run_env(dockerfile, "build-gateway")
    assert slim["MIRRORGATE_TORCH"] == "none"
    assert slim["MIRRORGATE_ONNXRUNTIME"] == "none"
    copies = [i.copy_parts() for i in dockerfile.stage("gateway").all("COPY")]
    assert ("build-gateway", ["/opt/mirrorgate"], "/opt/mirrorgate") in copies


def test_cuda_library_path_matches_the_python_of_the_base_image(dockerfile: Dockerfile) -> None:
    base = dockerfile.external_base("cuda")
    m = re.match(r"python:(\d+\.\d+)", base)
    assert m, base
    paths = dockerfile.config("cuda").env["LD_LIBRARY_PATH"].split(":")
    assert paths and all(
        p.startswith(f"/opt/mirrorgate/lib/python{m.group(1)}/site-packages/nvidia/") for p in paths
    )
    assert any(p.endswith("/cudnn/lib") for p in paths)
    assert dockerfile.external_base("build-cuda") == base


def _dockerignore_patterns() -> list[tuple[bool, str]]:
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, line.lstrip("!").strip("/")))
    return rules


def _pattern_matches(pattern: str, path: str) -> bool:
    """Docker's rule: a pattern that matches a folder matches everything below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    if pattern.startswith("**/"):
        tail = pattern[3:]
        return any(fnmatch.fnmatchcase(p, tail) for p in parts)
    return any(
        fnmatch.fnmatchcase(p, pattern) and p.count("/") == pattern.count("/") for p in prefixes
    )


def _in_context(path: str, rules: list[tuple[bool, str]]) -> bool:
    included = True
    for negated, pattern in rules:
        if _pattern_matches(pattern, path):
            included = negated
    return included


def _files(source: str) -> Iterator[str]:
    full = REPO / source
    if full.is_file():
        yield source
        return
    assert full.is_dir(), f"COPY source {source} does not exist"
    for path in full.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            yield path.relative_to(REPO).as_posix()


def test_dockerignore_keeps_every_copy_source_and_drops_the_rest(dockerfile: Dockerfile) -> None:
    rules = _dockerignore_patterns()
    sources = set()
    for stage in dockerfile.stages:
        for ins in stage.all("COPY"):
            origin, srcs, _ = ins.copy_parts()
            if origin is None:
                sources.update(srcs)
    assert sources
    for source in sorted(sources):
        files = list(_files(source))
        assert files, source
        for file in files:
            assert _in_context(file, rules), f"{file} (COPY {source}) is excluded by .dockerignore"
    for outside in (
        ".venv/bin/python",
        "tests/deploy/test_dockerfile.py",
        ".git/HEAD",
        "mirrorgate.sqlite",
    ):
        assert not _in_context(outside, rules), outside
    assert not _in_context("proxy/__pycache__/cli.cpython-311.pyc", rules)


def test_install_script_rejects_bad_input_before_touching_anything(tmp_path: Path) -> None:
    prefix = tmp_path / "venv"
    env = {**os.environ, "MIRRORGATE_TORCH": "rocm"}
    result = subprocess.run(
        ["bash", str(INSTALL), str(REPO), str(prefix)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "MIRRORGATE_TORCH must be none, cpu or cuda" in result.stderr
    assert not prefix.exists()
    result = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "usage" in result.stderr
    result = subprocess.run(
        ["bash", str(INSTALL), str(tmp_path), str(prefix)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "no pyproject.toml" in result.stderr
    env = {**os.environ, "MIRRORGATE_TORCH": "cpu"}
    env.pop("TORCH_INDEX_URL", None)
    result = subprocess.run(
        ["bash", str(INSTALL), str(REPO), str(prefix)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "needs TORCH_INDEX_URL" in result.stderr
    assert not prefix.exists()


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/v2/health/ready" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture()
def ready_server() -> Iterator[tuple[http.server.HTTPServer, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"status": 200})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def _healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MIRRORGATE_")}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_healthcheck_exit_codes_follow_readiness(
    ready_server: tuple[http.server.HTTPServer, type[_Handler]],
) -> None:
    server, handler = ready_server
    port = str(server.server_address[1])
    assert _healthcheck({"MIRRORGATE_SERVER__PORT": port}).returncode == 0
    handler.status = 503
    failed = _healthcheck({"MIRRORGATE_SERVER__PORT": port})
    assert failed.returncode == 1 and "HTTP 503" in failed.stderr
    url = f"http://127.0.0.1:{port}/elsewhere"
    assert _healthcheck({"MIRRORGATE_HEALTHCHECK_URL": url}).returncode == 1


def test_healthcheck_fails_when_nothing_listens() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the socket is closed again: nothing listens on that port
    result = _healthcheck({"MIRRORGATE_SERVER__PORT": str(port)})
    assert result.returncode == 1 and "healthcheck:" in result.stderr
