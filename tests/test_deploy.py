"""Deployment files, checked offline: hadolint, the ECS API model (botocore), Kubernetes' schemas
(kubernetes-validate over ``kubectl kustomize``), and what each must say to work with our image."""

from __future__ import annotations

import copy
import json
import re

import pytest

import yaml

from graviton_serve.deploy_checks import (DEPLOY_DIR, DOCKERFILES, ECS_TASKS, KSERVE_RESOURCES, KUSTOMIZATIONS,
                                          lint_dockerfile, render_kustomization, validate_ecs_task, validate_kserve,
                                          validate_kubernetes)
from graviton_serve.drain import DRAIN_TIMEOUT_S

PORTS = {8080, 8081, 8082, 7070, 7071}
KSERVE_CONFIG = DEPLOY_DIR / "kserve" / "config" / "config.properties"
LIVE = ["python", "-m", "graviton_serve.container", "--live"]
READY = ["python", "-m", "graviton_serve.container", "--ready"]


def names(paths):
    return [path.name for path in paths]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=names(DOCKERFILES))
def test_dockerfile_lints_clean_and_runs_our_entrypoint_as_non_root(dockerfile, tmp_path):
    assert lint_dockerfile(dockerfile) == []
    text = dockerfile.read_text()
    assert re.search(r"^USER 1000:1000$", text, re.M)
    assert set(map(int, re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split())) == PORTS
    assert 'CMD ["python", "-m", "graviton_serve.container", "--live"]' in text
    assert re.search(r'^ENTRYPOINT \["python", "-m", "graviton_serve.container"\]$', text, re.M)
    # Real defaults for real users; nothing of this machine (its local base, its package folders).
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    assert re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert not re.search(r"localhost|/opt/pypi|/opt/wheels|graviton-serve-base", text)
    # The linter can fail: an unpinned apt install is DL3008.
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM debian:bookworm\nRUN apt-get update && apt-get install -y curl\n")
    assert any("DL3008" in line for line in lint_dockerfile(broken))


@pytest.mark.parametrize("task_file", ECS_TASKS, ids=names(ECS_TASKS))
def test_ecs_task_definition_validates_against_the_ecs_api_model(task_file):
    task = json.loads(task_file.read_text())
    assert validate_ecs_task(task) == []
    (container,) = task["containerDefinitions"]
    assert {mapping["containerPort"] for mapping in container["portMappings"]} == PORTS
    assert container["healthCheck"]["command"] == ["CMD", *LIVE]
    assert container["stopTimeout"] > DRAIN_TIMEOUT_S
    assert container["user"] == "1000:1000" and container["readonlyRootFilesystem"] is True
    # A read-only root needs writable task volumes for the key file and logs, and /tmp.
    assert {mount["containerPath"] for mount in container["mountPoints"]} == {"/home/model-server/run", "/tmp"}
    assert task["runtimePlatform"]["cpuArchitecture"] == "ARM64"
    assert container["logConfiguration"]["logDriver"] == "awslogs"
    if "gpu" in task_file.name:
        assert {"type": "GPU", "value": "1"} in container["resourceRequirements"]
        assert task["requiresCompatibilities"] == ["EC2"]  # Fargate has no GPUs
    broken = copy.deepcopy(task)
    broken["containerDefinitions"][0]["portMappings"][0]["containerPort"] = "8080"
    assert validate_ecs_task(broken)  # a string port is refused


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=names(KUSTOMIZATIONS))
def test_kubernetes_manifests_validate_against_the_openapi_schemas(folder):
    resources = render_kustomization(folder)
    assert sorted(r["kind"] for r in resources) == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    for resource in resources:
        assert validate_kubernetes(resource) == []
    deployment = next(r for r in resources if r["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["nodeSelector"]["kubernetes.io/arch"] == "arm64"
    assert pod["securityContext"]["runAsUser"] == 1000 and pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["terminationGracePeriodSeconds"] > DRAIN_TIMEOUT_S
    assert container["readinessProbe"]["exec"]["command"] == READY
    assert container["livenessProbe"]["exec"]["command"] == LIVE
    # Whole CPUs with requests == limits: threads follow the quota, the pod is Guaranteed.
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert float(container["resources"]["limits"]["cpu"]).is_integer()
    assert {port["containerPort"] for port in container["ports"]} == PORTS
    if folder.name == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert deployment["metadata"]["name"].endswith("-gpu")
    selector = next(r for r in resources if r["kind"] == "Service")["spec"]["selector"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "two"
    assert validate_kubernetes(broken)


@pytest.mark.parametrize("resource", KSERVE_RESOURCES, ids=names(KSERVE_RESOURCES))
def test_kserve_resources_validate_against_the_kserve_sdk_models(resource, tmp_path):
    assert validate_kserve(resource) == []
    document = yaml.safe_load(resource.read_text())
    runtime = yaml.safe_load((DEPLOY_DIR / "kserve" / "servingruntime.yaml").read_text())
    if document["kind"] == "InferenceService":
        assert document["spec"]["predictor"]["model"]["modelFormat"]["name"] == "pytorch"
        assert document["spec"]["predictor"]["nodeSelector"]["kubernetes.io/arch"] == "arm64"
        assert document["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
        field = "minReplicas:"
    else:
        (container,) = document["spec"]["containers"]
        assert container["command"] == ["python", "-m", "graviton_serve.kserve_runtime"]
        assert {"name": "TS_SERVICE_ENVELOPE", "value": "{{.Labels.serviceEnvelope}}"} in container["env"]
        assert container["securityContext"]["runAsUser"] == 1000
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        field = "protocolVersions:"
    broken = tmp_path / "broken.yaml"
    broken.write_text(resource.read_text().replace(field, field.replace("s:", ":")))
    assert any(f"{field[:-2]}: no such field" in problem for problem in validate_kserve(broken))


def test_kserve_storage_config_serves_every_demo_model_one_request_per_batch():
    from graviton_serve.families import demos
    from graviton_serve.torchserve_config import read_properties

    properties = read_properties(KSERVE_CONFIG)  # our validator: every key a TorchServe 0.12 key
    assert properties["model_store"] == "/mnt/models/model-store"
    assert properties["enable_envvars_config"] == "true"  # KServe's TS_SERVICE_ENVELOPE reaches TorchServe
    snapshot = json.loads(properties["model_snapshot"])
    assert sorted(snapshot["models"]) == sorted(demos())
    for name, versions in snapshot["models"].items():
        (version,) = versions.values()
        assert version["marName"] == f"{name}.mar" and version["batchSize"] == 1
