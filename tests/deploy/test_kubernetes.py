"""Kubernetes manifests: schema validation offline, and the facts that tie them together.

Built-in kinds are validated with kubernetes-validate (the upstream OpenAPI schemas,
shipped in the package; strict: unknown fields are errors) against the oldest and newest
Kubernetes versions we claim. Custom resources (ServiceMonitor, PrometheusRule, Rollout,
AnalysisTemplate, Canary, MetricTemplate) have no schema there: each is validated with a
small JSON schema of ours in tests/deploy/schemas/ (the fields mirrorgate uses, no
others), and a Rollout's pod template is validated as a Deployment's. A kind with neither
fails the test, so a new manifest cannot slip through unchecked.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from sqlalchemy.engine import make_url

from proxy.core.config import BackendSettings, MirrorgateConfig, load_config
from tests.deploy.dockerfile import parse
from tests.deploy.helpers import DEPLOY, REPO, config_checksum, load_yaml_documents, manifests

K8S_VERSIONS = ("1.27.0", "1.37.0")
SCHEMAS = Path(__file__).parent / "schemas"
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.json",
    ("argoproj.io/v1alpha1", "Rollout"): "rollout.json",
    ("argoproj.io/v1alpha1", "AnalysisTemplate"): "analysistemplate.json",
    ("flagger.app/v1beta1", "Canary"): "canary.json",
    ("flagger.app/v1beta1", "MetricTemplate"): "metrictemplate.json",
}
FOLDERS = (DEPLOY / "kubernetes", DEPLOY / "argo-rollouts", DEPLOY / "flagger")
K8S = DEPLOY / "kubernetes"


@functools.cache
def _objects() -> tuple[tuple[Path, dict[str, Any]], ...]:
    # parsed once; tests that change a manifest work on a deep copy
    return tuple(item for folder in FOLDERS for item in manifests(folder))


def _id(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path.relative_to(DEPLOY)}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def _find(kind: str, name: str, folder: Path | None = None) -> dict[str, Any]:
    for path, doc in _objects():
        if folder is not None and folder not in path.parents:
            continue
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name}")


def validate(doc: dict[str, Any]) -> None:
    """Raise on the first schema violation of ``doc``."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CUSTOM_KINDS:
        schema = json.loads((SCHEMAS / CUSTOM_KINDS[key]).read_text())
        jsonschema.Draft202012Validator(schema).validate(doc)
        if doc["kind"] == "Rollout":
            # the pod template of a Rollout is a Deployment's
            validate(
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": doc["metadata"],
                    "spec": {
                        "selector": doc["spec"]["selector"],
                        "template": doc["spec"]["template"],
                    },
                }
            )
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError as exc:
            raise AssertionError(
                f"{exc.message}: add a JSON schema in tests/deploy/schemas for this custom resource"
            ) from exc


@pytest.mark.parametrize("item", _objects(), ids=_id)
def test_manifest_is_valid(item: tuple[Path, dict[str, Any]]) -> None:
    validate(item[1])


def test_every_folder_has_manifests() -> None:
    kinds = {doc["kind"] for _, doc in _objects()}
    expected = {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "StatefulSet",
        "ServiceMonitor",
        "Rollout",
    }
    expected |= {"AnalysisTemplate", "Canary", "MetricTemplate", "PrometheusRule", "ServiceAccount"}
    assert expected <= kinds


@pytest.mark.parametrize(
    ("kind", "break_it"),
    [
        (
            "Deployment",
            lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
                ports=[{"containerPort": "x"}]
            ),
        ),
        ("Deployment", lambda d: d["spec"]["template"]["spec"].update(terminationGracePeriod=30)),
        ("Rollout", lambda d: d["spec"]["strategy"]["canary"]["steps"].append({"setWeight": 150})),
        ("Rollout", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(image=7)),
        (
            "AnalysisTemplate",
            lambda d: d["spec"]["metrics"][0]["provider"]["web"].update(jsonPath="verdict"),
        ),
        ("Canary", lambda d: d["spec"]["analysis"]["webhooks"][0].update(type="before-rollout")),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval="often")),
    ],
)
def test_validation_rejects_broken_manifests(kind: str, break_it: Any) -> None:
    """The checks are not vacuous: a typical mistake in each kind is caught."""
    doc = copy.deepcopy(next(d for _, d in _objects() if d["kind"] == kind))
    break_it(doc)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(doc)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {
        p.relative_to(K8S).as_posix() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"
    }
    assert listed == present
    image_names = {i["name"] for i in kustomization["images"]}
    for _, doc in manifests(K8S):
        if doc["kind"] == "Deployment":
            for container in doc["spec"]["template"]["spec"]["containers"]:
                assert container["image"] in image_names


def _config() -> MirrorgateConfig:
    text = _find("ConfigMap", "mirrorgate-config")["data"]["mirrorgate.yaml"]
    return load_config(data=yaml.safe_load(text), env={})


def _container() -> dict[str, Any]:
    deployment = _find("Deployment", "mirrorgate", K8S)
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def test_configmap_holds_a_valid_mirrorgate_config() -> None:
    config = _config()
    assert config.server.host == "0.0.0.0"
    assert config.server.control_token is None, "the token belongs in the Secret"
    assert config.storage.url.startswith("postgresql+psycopg://")
    assert make_url(config.storage.url).password is None, "the password belongs in the Secret"


def test_deployment_runs_the_image_command_on_the_mounted_config() -> None:
    container = _container()
    image_cfg = parse(REPO / "Dockerfile").config("runtime")
    assert container["args"] == image_cfg.cmd
    config_path = image_cfg.cmd[image_cfg.cmd.index("--config") + 1]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {
        v["name"]: v
        for v in _find("Deployment", "mirrorgate", K8S)["spec"]["template"]["spec"]["volumes"]
    }
    config_mount = next(m for m in mounts.values() if config_path.startswith(m["mountPath"] + "/"))
    assert config_mount["readOnly"] is True
    config_map = volumes[config_mount["name"]]["configMap"]["name"]
    key = config_path.removeprefix(config_mount["mountPath"] + "/")
    assert key in _find("ConfigMap", config_map)["data"]


def test_probes_and_ports_match_the_config() -> None:
    container = _container()
    port = _config().server.port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == port
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    template = _find("Deployment", "mirrorgate", K8S)["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_grace_period_covers_prestop_pause_and_drain() -> None:
    """SIGKILL must not cut the drain short: preStop + shutdown_timeout_s < grace period."""
    container = _container()
    pod = _find("Deployment", "mirrorgate", K8S)["spec"]["template"]["spec"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = float(command[1])
    drain = _config().server.shutdown_timeout_s
    assert pause > 0
    assert pod["terminationGracePeriodSeconds"] > pause + drain


def test_pod_is_locked_down() -> None:
    pod = _find("Deployment", "mirrorgate", K8S)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    security = _container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # a read-only root needs a writable /tmp
    assert any(m["mountPath"] == "/tmp" for m in _container()["volumeMounts"])


def test_environment_comes_from_keys_the_secret_has() -> None:
    container = _container()
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert set(env) == {
        "MIRRORGATE_CONTROL__READ_TOKEN",
        "MIRRORGATE_CONTROL__WRITE_TOKEN",
        "MIRRORGATE_STORAGE__URL",
    }
    for ref in env.values():
        secret = _find("Secret", ref["name"])
        assert ref["key"] in secret["stringData"]
    # two tokens, two scopes: reading a verdict must not allow forcing a promote
    assert (
        env["MIRRORGATE_CONTROL__READ_TOKEN"]["key"]
        != env["MIRRORGATE_CONTROL__WRITE_TOKEN"]["key"]
    )


def test_config_changes_roll_the_pods() -> None:
    """The pod template carries the ConfigMap's checksum: a config edit rolls the pods."""
    template = _find("Deployment", "mirrorgate", K8S)["spec"]["template"]
    annotation = template["metadata"]["annotations"]["mirrorgate.io/config-checksum"]
    assert annotation == config_checksum(_find("ConfigMap", "mirrorgate-config")), (
        "configmap.yaml changed: put its new checksum in deployment.yaml"
    )


def test_proxy_survives_disruptions_and_spreads_over_nodes() -> None:
    deployment = _find("Deployment", "mirrorgate", K8S)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = _find("PodDisruptionBudget", "mirrorgate", K8S)
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert 1 <= pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} >= {"kubernetes.io/hostname"}
    for constraint in spread:
        assert constraint["labelSelector"]["matchLabels"].items() <= pod_labels.items()


def test_network_policies_select_the_pods_and_admit_the_controllers() -> None:
    deployment = _find("Deployment", "mirrorgate", K8S)
    policy = _find("NetworkPolicy", "mirrorgate", K8S)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    port = _config().server.port
    (rule,) = policy["spec"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == [port]
    namespaces = {
        f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for f in rule["from"]
        if "namespaceSelector" in f
    }
    assert {"argo-rollouts", "flagger-system", "monitoring"} <= namespaces
    egress_ports = {p["port"] for r in policy["spec"]["egress"] for p in r["ports"]}
    assert {53, 8000, 5432} <= egress_ports
    loadtester = _find("NetworkPolicy", "mirrorgate-loadtester", DEPLOY / "flagger")
    (only,) = loadtester["spec"]["ingress"]
    assert only["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "flagger-system"}}}
    ]


def test_database_url_matches_the_example_postgres() -> None:
    url = make_url(_find("Secret", "mirrorgate-secrets")["stringData"]["database-url"])
    pg = _find("Secret", "mirrorgate-postgres")["stringData"]
    assert url.drivername == "postgresql+psycopg"
    assert (url.username, url.password, url.database) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )
    service = _find("Service", "postgres")
    assert url.host == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"]
    statefulset = _find("StatefulSet", "postgres")
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_service_and_servicemonitor_reach_the_pods() -> None:
    service = _find("Service", "mirrorgate", K8S)
    pod_labels = _find("Deployment", "mirrorgate", K8S)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in _container()["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in port_names
    monitor = _find("ServiceMonitor", "mirrorgate")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"


def test_backends_point_at_the_services_the_controllers_maintain() -> None:
    config = _config()
    candidate = config.models.candidate
    assert candidate is not None
    urls = {config.models.champion.url, candidate.url}
    # Argo Rollouts: stableService / canaryService are Services in rollout.yaml
    rollout = _find("Rollout", "classifier")
    canary = rollout["spec"]["strategy"]["canary"]
    argo = {}
    for role in ("stableService", "canaryService"):
        service = _find("Service", canary[role], DEPLOY / "argo-rollouts")
        argo[role] = f"http://{canary[role]}:{service['spec']['ports'][0]['port']}"
    assert config.models.champion.url == argo["stableService"]
    assert candidate.url == argo["canaryService"]
    # Flagger: <service name or target>-primary / -canary on the Canary's service port
    flagger = _find("Canary", "classifier")["spec"]
    apex = flagger["service"].get("name", flagger["targetRef"]["name"])
    port = flagger["service"]["port"]
    assert urls == {f"http://{apex}-primary:{port}", f"http://{apex}-canary:{port}"}
    _find("Deployment", flagger["targetRef"]["name"], DEPLOY / "flagger")


def test_flagger_suite_model_is_a_backend_spec_for_the_canary() -> None:
    data = _find("ConfigMap", "mirrorgate-suite-model")["data"]["candidate.yaml"]
    backend = BackendSettings.model_validate(yaml.safe_load(data))
    candidate = _config().models.candidate
    assert candidate is not None and backend.url == candidate.url


def test_loadtester_runs_the_dockerfile_loadtester_target() -> None:
    deployment = _find("Deployment", "mirrorgate-loadtester")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    image_cfg = parse(REPO / "Dockerfile").config("flagger-loadtester")
    assert image_cfg.entrypoint == ["flagger-loadtester"]
    assert container["args"] == image_cfg.cmd
    port = int(image_cfg.cmd[0].split("=")[1])
    assert container["ports"][0]["containerPort"] == port
    uid = int((image_cfg.user or "0").split(":")[0])
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid
    service = _find("Service", "mirrorgate-loadtester")
    for hook in _find("Canary", "classifier")["spec"]["analysis"]["webhooks"]:
        if hook["metadata"].get("type") == "bash":  # loadtester tasks
            assert hook["url"].startswith(f"http://{service['metadata']['name']}.")
        else:  # mirrorgate's own webhook endpoints, by the Service's FQDN
            assert hook["url"].startswith("http://mirrorgate.ml-serving.svc.cluster.local:")
    for volume in deployment["spec"]["template"]["spec"]["volumes"]:
        if "configMap" in volume:
            _find("ConfigMap", volume["configMap"]["name"])


def test_yaml_files_parse_into_mappings() -> None:
    for folder in FOLDERS:
        for path in folder.rglob("*.yaml"):
            assert load_yaml_documents(path), path
