"""Helpers of the deployment-artefact tests.

The external checkers (hadolint, shellcheck, promtool, kubernetes-validate) are real
programs. Where one is missing the test is skipped locally, but fails under CI
(``MIRRORGATE_REQUIRE_SERVICES=1``, set by scripts/test_env.sh), so a missing install step
cannot turn into a silently green run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def require_tool(name: str) -> str:
    """Path of an executable: the test venv's bin/ first (pip-installed tools), then PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed (see scripts/ensure_services.sh and pyproject's dev extra)"
    if os.environ.get("MIRRORGATE_REQUIRE_SERVICES"):
        pytest.fail(message)
    pytest.skip(message)


def run_tool(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, **kwargs)


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: every YAML document must be a mapping"
    return docs


def manifests(folder: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object in the YAML files under ``folder`` (kustomization excluded)."""
    for path in sorted(folder.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_yaml_documents(path):
            yield path, doc


def config_checksum(configmap: dict[str, Any]) -> str:
    """sha256 of a ConfigMap's data, as deployment.yaml's checksum annotation holds it."""
    import hashlib
    import json

    blob = json.dumps(configmap.get("data", {}), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
