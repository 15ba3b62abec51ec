"""deploy/compose.yaml: it parses, every file it names exists, and its parts fit together.

No Docker engine (nor the compose plugin) runs here, so the checks are the ones a first
`docker compose up` would otherwise find the hard way: missing mounts, a build target or
build argument the Dockerfile lacks, a config mirrorgate rejects, backends or databases
addressed by the wrong name or port, a Prometheus config promtool rejects, and Triton
model repositories whose config disagrees with the ONNX model.
"""

from __future__ import annotations

import importlib.util
import re
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from sqlalchemy.engine import make_url

from proxy.core.config import MirrorgateConfig, load_config
from tests.deploy.dockerfile import parse
from tests.deploy.helpers import DEPLOY, REPO, run_tool

COMPOSE = DEPLOY / "compose.yaml"
MODELS = DEPLOY / "compose" / "models"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    service: dict[str, Any] = compose["services"][name]
    return service


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host source, for the short volume syntax."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def _mirrorgate_config(compose: dict[str, Any]) -> MirrorgateConfig:
    service = _service(compose, "mirrorgate")
    source = _mounts(service)["/etc/mirrorgate/mirrorgate.yaml"]
    return load_config(DEPLOY / source, env=service["environment"])


def test_services(compose: dict[str, Any]) -> None:
    assert {"mirrorgate", "postgres", "prometheus", "champion", "candidate"} <= set(
        compose["services"]
    )


def test_every_mounted_file_exists(compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source in _mounts(service).values():
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
            else:
                assert source in named, f"{name}: volume {source} is not declared"


def test_published_ports_stay_on_loopback(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port}"


def test_mirrorgate_builds_from_this_dockerfile(compose: dict[str, Any]) -> None:
    build = _service(compose, "mirrorgate")["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == REPO
    dockerfile = parse(context / build["dockerfile"])
    stage_names = {s.name for s in dockerfile.stages}
    assert build["target"] in stage_names
    declared = {
        ins.value.partition("=")[0]
        for stage in dockerfile.stages
        for ins in stage.instructions
        if ins.keyword == "ARG"
    }
    assert set(build.get("args", {})) <= declared


def test_mirrorgate_config_validates_and_names_the_services(compose: dict[str, Any]) -> None:
    config = _mirrorgate_config(compose)
    candidate = config.models.candidate
    assert candidate is not None
    for role, backend in (("champion", config.models.champion), ("candidate", candidate)):
        assert backend.kind == "http"
        url = urllib.parse.urlsplit(backend.url or "")
        assert url.hostname == role and url.hostname in compose["services"]
        command = " ".join(_service(compose, role)["command"])
        assert f"--http-port={url.port}" in command
        repository = DEPLOY / _mounts(_service(compose, role))["/models"]
        assert (repository / str(backend.model) / "config.pbtxt").is_file()


def test_database_url_matches_the_postgres_service(compose: dict[str, Any]) -> None:
    config = _mirrorgate_config(compose)
    url = make_url(config.storage.url)
    env = _service(compose, "postgres")["environment"]
    assert url.drivername == "postgresql+psycopg"
    assert (url.username, url.password, url.database) == (
        env["POSTGRES_USER"],
        env["POSTGRES_PASSWORD"],
        env["POSTGRES_DB"],
    )
    assert url.host == "postgres" and url.port == 5432
    depends = _service(compose, "mirrorgate")["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"


def test_stop_grace_period_covers_the_drain(compose: dict[str, Any]) -> None:
    config = _mirrorgate_config(compose)
    period = _service(compose, "mirrorgate")["stop_grace_period"]
    m = re.fullmatch(r"(\d+)s", period)
    assert m, period
    assert int(m.group(1)) > config.server.shutdown_timeout_s


def test_prometheus_config_passes_promtool_and_scrapes_mirrorgate(
    compose: dict[str, Any], promtool: str
) -> None:
    mounts = _mounts(_service(compose, "prometheus"))
    config_path = DEPLOY / mounts["/etc/prometheus/prometheus.yml"]
    result = run_tool([promtool, "check", "config", str(config_path)])
    assert result.returncode == 0, result.stdout + result.stderr
    prom = yaml.safe_load(config_path.read_text())
    # the rule file is mounted beside the config, where the relative name points
    for rule_file in prom["rule_files"]:
        assert f"/etc/prometheus/{rule_file}" in mounts
    targets = [
        t for job in prom["scrape_configs"] for c in job["static_configs"] for t in c["targets"]
    ]
    port = _mirrorgate_config(compose).server.port
    assert f"mirrorgate:{port}" in targets


def test_grafana_provisions_the_dashboard(compose: dict[str, Any]) -> None:
    mounts = _mounts(_service(compose, "grafana"))
    provisioning = DEPLOY / mounts["/etc/grafana/provisioning"]
    providers = yaml.safe_load((provisioning / "dashboards" / "mirrorgate.yaml").read_text())[
        "providers"
    ]
    folder = providers[0]["options"]["path"]
    dashboards = [target for target in mounts if target.startswith(folder + "/")]
    assert dashboards and (DEPLOY / mounts[dashboards[0]]).name == "mirrorgate-dashboard.json"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert urllib.parse.urlsplit(sources[0]["url"]).hostname == "prometheus"


def test_model_repositories_are_what_build_models_writes(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "build_models", DEPLOY / "compose" / "build_models.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for path in module.write(tmp_path):
        committed = MODELS / path.relative_to(tmp_path)
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale: run build_models.py"
        )


def _pbtxt_io(text: str) -> dict[str, tuple[str, list[int]]]:
    found = re.findall(r'name:\s*"(\w+)"\s*data_type:\s*(\w+)\s*dims:\s*\[([^\]]*)\]', text)
    return {name: (dtype, [int(d) for d in dims.split(",")]) for name, dtype, dims in found}


def test_triton_configs_match_the_onnx_models() -> None:
    x = np.array([[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 2.0]], dtype=np.float32)
    outputs = {}
    for role in ("champion", "candidate"):
        folder = MODELS / role / "classifier"
        config = (folder / "config.pbtxt").read_text()
        assert re.search(r'name:\s*"classifier"', config)
        io = _pbtxt_io(config)
        session = ort.InferenceSession(
            str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        (inp,) = session.get_inputs()
        (out,) = session.get_outputs()
        # max_batch_size > 0: Triton's dims leave out the (dynamic) batch dimension
        assert io[inp.name] == ("TYPE_FP32", list(inp.shape[1:]))
        assert io[out.name] == ("TYPE_FP32", list(out.shape[1:]))
        assert isinstance(inp.shape[0], str)
        (probs,) = session.run(None, {inp.name: x})
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)
        outputs[role] = probs
    assert not np.allclose(outputs["champion"], outputs["candidate"])
