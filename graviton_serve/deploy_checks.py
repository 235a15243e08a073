"""Offline checks of the deployment files (no Docker engine, no cluster, no AWS account needed):
Dockerfiles through hadolint, ECS task definitions against the ECS API model botocore ships,
Kubernetes manifests rendered by ``kubectl kustomize`` against Kubernetes' OpenAPI schemas
(kubernetes-validate). Each returns a list of problems; empty means it passed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from graviton_serve.paths import CACHE_DIR, ROOT
from graviton_serve.progress import say

DEPLOY_DIR = ROOT / "deploy"
DOCKERFILES = [ROOT / "docker" / "Dockerfile"]
ECS_TASKS = sorted((DEPLOY_DIR / "ecs").glob("*.json"))
KUSTOMIZATIONS = [DEPLOY_DIR / "k8s" / "base", DEPLOY_DIR / "k8s" / "gpu"]
KUBERNETES_VERSION = "1.32.0"  # EKS standard support at the time of writing
KSERVE_RESOURCES = sorted((DEPLOY_DIR / "kserve").glob("*.yaml"))
KSERVE_SDK = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["kserve"][0]
KSERVE_ENV = CACHE_DIR / "kserve-sdk-env"  # its own venv: the SDK's pins clash with ours


def lint_dockerfile(path: Path) -> list[str]:
    hadolint = Path(sys.executable).with_name("hadolint")
    if not hadolint.exists():
        hadolint = Path(shutil.which("hadolint") or "hadolint")
    result = subprocess.run([str(hadolint), "--no-color", str(path)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()] if result.returncode else []


def validate_ecs_task(task: dict) -> list[str]:
    import botocore.session
    from botocore.validate import ParamValidator

    shape = botocore.session.get_session().get_service_model("ecs").operation_model("RegisterTaskDefinition").input_shape
    report = ParamValidator().validate(task, shape)
    return report.generate_report().splitlines() if report.has_errors() else []


def render_kustomization(folder: Path) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"kubectl kustomize {folder} failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def validate_kubernetes(resource: dict, version: str = KUBERNETES_VERSION) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}: {error.message} at {list(error.path)}"]
    return []


def kserve_python() -> Path:
    """A cached venv with only the KServe SDK (made once: about 80 s and 450 MB)."""
    python = KSERVE_ENV / "bin" / "python"
    stamp = KSERVE_ENV / "installed.txt"
    if stamp.exists() and stamp.read_text() == KSERVE_SDK:
        return python
    say(f"deploy checks: installing {KSERVE_SDK} into {KSERVE_ENV} (once)")
    shutil.rmtree(KSERVE_ENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(KSERVE_ENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", KSERVE_SDK, "pyyaml"],
                   check=True)
    stamp.write_text(KSERVE_SDK)
    return python


def validate_kserve(path: Path) -> list[str]:
    """Problems of a KServe resource against the KServe SDK's models (graviton_serve.kserve_schema)."""
    result = subprocess.run([str(kserve_python()), "-m", "graviton_serve.kserve_schema", str(path)], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"kserve schema check crashed: {result.stderr.strip()[-500:]}")
    return result.stdout.splitlines()


def check_all() -> dict[str, list[str]]:
    """Every deployment file -> its problems (for a one-shot command-line check)."""
    problems: dict[str, list[str]] = {}
    for dockerfile in DOCKERFILES:
        problems[str(dockerfile.relative_to(ROOT))] = lint_dockerfile(dockerfile)
    for task in ECS_TASKS:
        problems[str(task.relative_to(ROOT))] = validate_ecs_task(json.loads(task.read_text()))
    for folder in KUSTOMIZATIONS:
        found = []
        for resource in render_kustomization(folder):
            found += validate_kubernetes(resource)
        problems[str(folder.relative_to(ROOT))] = found
    for resource in KSERVE_RESOURCES:
        problems[str(resource.relative_to(ROOT))] = validate_kserve(resource)
    return problems
