"""Deployment files read mechanically into ``podman run`` arguments, so that a test runs the
container exactly as the file declares it (tests/test_deploy_engines.py).

Every key of the file is either mapped or listed as what only the real engine does; a key this
module does not know is an error (a new setting is never ignored silently). Ports are published
by the test itself on free loopback ports; the container ports are returned to check against.
A CPU limit above this machine's CPUs is capped at them (podman refuses more).
"""

from __future__ import annotations

import json
import os

# ECS task definition keys that only ECS acts on: what running them under podman cannot prove.
ECS_ONLY_TASK_KEYS = {
    "family": "the task definition's name",
    "requiresCompatibilities": "Fargate/EC2 placement",
    "runtimePlatform": "arm64 placement (this image is the machine's arch)",
    "networkMode": "awsvpc: the task's own ENI (here: podman's own network namespace, ports published on loopback)",
    "executionRoleArn": "IAM: pulling from ECR, writing to CloudWatch",
    "placementConstraints": "instance type placement",
}
ECS_ONLY_CONTAINER_KEYS = {
    "name": "the container's name in the task",
    "image": "the ECR image (here: the image built from docker/Dockerfile)",
    "essential": "a task with one container: ECS stops the task when it exits",
    "logConfiguration": "awslogs to CloudWatch (here: podman logs)",
    "portMappings": "published by the test on free loopback ports",
    "resourceRequirements": "a GPU (GPU task: not run here)",
}


def _cpus(count: float) -> str:
    return f"--cpus={min(count, os.cpu_count() or 1):g}"


def _health_check(check: dict) -> list[str]:
    kind, *command = check["command"]
    if kind not in ("CMD", "CMD-SHELL"):
        raise ValueError(f"healthCheck.command must start with CMD or CMD-SHELL, got {kind!r}")
    health = json.dumps(command) if kind == "CMD" else command[0]
    return [f"--health-cmd={health}", f"--health-interval={check.get('interval', 30)}s",
            f"--health-timeout={check.get('timeout', 5)}s", f"--health-retries={check.get('retries', 3)}",
            f"--health-start-period={check.get('startPeriod', 0)}s"]


def ecs_run_arguments(task: dict, volume_prefix: str) -> tuple[list[str], list[int], dict[str, str]]:
    """``podman run`` arguments for the task's one container (before the image), its container
    ports, and what only ECS does (key -> why). Task volumes without a host are Docker volumes:
    ``{volume_prefix}{name}`` named volumes, filled from the image's folder as Docker fills them."""
    unknown = set(task) - set(ECS_ONLY_TASK_KEYS) - {"cpu", "memory", "volumes", "containerDefinitions"}
    if unknown:
        raise KeyError(f"task keys this mapping does not know: {sorted(unknown)}")
    (container,) = task["containerDefinitions"]
    arguments = [_cpus(int(task["cpu"]) / 1024), f"--memory={int(task['memory'])}m"]
    volumes = {volume["name"] for volume in task.get("volumes", [])}
    ecs_only = {key: why for key, why in ECS_ONLY_TASK_KEYS.items() if key in task}
    for key, value in container.items():
        if key in ECS_ONLY_CONTAINER_KEYS:
            ecs_only[f"containerDefinitions[0].{key}"] = ECS_ONLY_CONTAINER_KEYS[key]
        elif key == "user":
            arguments.append(f"--user={value}")
        elif key == "readonlyRootFilesystem":
            arguments += ["--read-only"] if value else []
        elif key == "mountPoints":
            for mount in value:
                if mount["sourceVolume"] not in volumes:
                    raise KeyError(f"mountPoints: no task volume {mount['sourceVolume']!r}")
                arguments.append(f"--volume={volume_prefix}{mount['sourceVolume']}:{mount['containerPath']}"
                                 f"{':ro' if mount.get('readOnly') else ''}")
        elif key == "environment":
            arguments += [f"--env={item['name']}={item['value']}" for item in value]
        elif key == "healthCheck":
            arguments += _health_check(value)
        elif key == "stopTimeout":
            arguments.append(f"--stop-timeout={value}")
        elif key == "linuxParameters":
            for linux_key, linux_value in value.items():
                if linux_key == "capabilities":
                    arguments += [f"--cap-drop={cap}" for cap in linux_value.get("drop", [])]
                    arguments += [f"--cap-add={cap}" for cap in linux_value.get("add", [])]
                elif linux_key == "initProcessEnabled":
                    arguments += ["--init"] if linux_value else []
                else:
                    raise KeyError(f"linuxParameters.{linux_key}: not known to this mapping")
        else:
            raise KeyError(f"containerDefinitions[0].{key}: not known to this mapping")
    return arguments, [mapping["containerPort"] for mapping in container.get("portMappings", [])], ecs_only


def serving_runtime_arguments(runtime: dict, labels: dict[str, str]) -> tuple[list[str], list[int]]:
    """``podman run`` arguments for a KServe ServingRuntime's one container (before the image) and
    its container ports. ``{{.Labels.x}}`` in env values is filled from ``labels``, as KServe's
    controller does; emptyDir volumes are empty tmpfs folders the user can write; KServe's storage mount
    (/mnt/models) is the test's to add."""
    (container,) = runtime["spec"]["containers"]
    empty_dirs = {volume["name"] for volume in runtime["spec"].get("volumes", []) if "emptyDir" in volume}
    arguments = [f"--entrypoint={json.dumps(container['command'])}"] if "command" in container else []
    for item in container.get("env", []):
        value = item["value"]
        for label, label_value in labels.items():
            value = value.replace(f"{{{{.Labels.{label}}}}}", label_value)
        if "{{" in value:
            raise KeyError(f"env {item['name']}: no label for {value}")
        arguments.append(f"--env={item['name']}={value}")
    security = container.get("securityContext", {})
    if "runAsUser" in security:
        arguments.append(f"--user={security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}")
    arguments += ["--read-only"] if security.get("readOnlyRootFilesystem") else []
    arguments += ["--security-opt=no-new-privileges"] if security.get("allowPrivilegeEscalation") is False else []
    arguments += [f"--cap-drop={cap}" for cap in security.get("capabilities", {}).get("drop", [])]
    limits = container.get("resources", {}).get("limits", {})
    if "cpu" in limits:
        arguments.append(_cpus(float(limits["cpu"])))
    if "memory" in limits:
        memory = str(limits["memory"])
        arguments.append(f"--memory={memory[:-2] + 'g' if memory.endswith('Gi') else memory}")
    for mount in container.get("volumeMounts", []):
        if mount["name"] not in empty_dirs:
            raise KeyError(f"volumeMounts: {mount['name']!r} is not an emptyDir volume of the runtime")
        # Empty and writable by the container's user, as an emptyDir (podman 4.3.1 gives a tmpfs the
        # mode of the image's folder under it, hence U: owned by the user instead).
        arguments.append(f"--tmpfs={mount['mountPath']}:rw,mode=0777,U")
    return arguments, [port["containerPort"] for port in container.get("ports", [])]
