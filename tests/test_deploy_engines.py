"""The deployment files run by real engines on this machine, with the image scripts/test builds:

- deploy/k8s/base rendered by ``kubectl kustomize`` (through an overlay that names the local image
  and gives each replica 1 CPU: this machine has 2) and played by ``podman kube play``: one pod
  per replica, the pod's security context and CPU limit as declared, the exec probes, answers
  from each replica, and a pod stop that drains.
- deploy/kserve: the ServingRuntime's container (tests/deploy_mapping.py reads it into podman
  flags) with KServe's storage layout on /mnt/models (the shipped config.properties, its model
  snapshot cut to two models), called through KServe's ModelServer over REST v1, REST v2 and gRPC v2.
- deploy/ecs/task-cpu.json's container mapped mechanically to ``podman run``: answered, health
  checked, stopped with its own stop timeout while requests are in flight.

What only the real engines do (Service routing, HPA, PDB, readiness gating, arm64 scheduling,
awslogs, IAM) is in the README, Deploy. Needs root and podman (and kubectl for Kubernetes):
elsewhere one skip reason."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from graviton_serve import image
from graviton_serve.deploy_checks import DEPLOY_DIR, kserve_python
from graviton_serve.paths import MODEL_STORE
from graviton_serve.torchserve_config import read_properties, write_properties
from tests.conftest import TESTS
from tests.deploy_mapping import ecs_run_arguments, serving_runtime_arguments
from tests.test_image import HOME, INSIDE_PORTS, NAME_PREFIX, RunningImage, containers, engine, sample, tag  # noqa: F401

REASON = image.unavailable_reason() or (None if shutil.which("kubectl") else "kubectl is not installed")
pytestmark = [pytest.mark.integration, pytest.mark.container,
              pytest.mark.skipif(REASON is not None, reason=f"deployment engine tests: {REASON}")]

# Every pod, container and volume the Kubernetes test plays (apart from NAME_PREFIX, whose check at
# the containers fixture's teardown would see pods that are still up).
KUBE_PREFIX = f"gs-k8s-{os.getpid()}-"
KSERVE_MODELS = ["mnist", "bert_sentiment"]
DIGIT = base64.b64encode((TESTS / "data" / "digit.png").read_bytes()).decode()


def status_lines(container) -> dict[str, str]:
    """/proc/1/status of the container's main process: Uid, Gid, CapEff, CapBnd, NoNewPrivs."""
    status = container.exec("cat", "/proc/1/status").stdout.decode()
    return {key: re.search(rf"^{key}:\s*(.*)$", status, re.M).group(1).strip()
            for key in ("Uid", "Gid", "CapEff", "CapBnd", "NoNewPrivs")}


def assert_hardened(container) -> None:
    status = status_lines(container)
    print(f"{container.name} /proc/1/status: {status}")
    assert status["Uid"].split()[0] == "1000" and status["Gid"].split()[0] == "1000", status
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0, status
    write = container.exec("touch", "/opt/graviton-serve/x")
    assert write.returncode != 0 and b"Read-only file system" in write.stderr


def assert_answers_samples(container) -> None:
    for model in KSERVE_MODELS:
        body, content_type = sample(model)
        reply = container.post(model, body, content_type)
        assert reply.status_code == 200, f"{container.name} {model}: {reply.status_code} {reply.text[:300]}"
        if model == "mnist":
            assert next(iter(reply.json())) == "7", reply.text  # tests/data/digit.png is a 7
        else:
            assert reply.json()["label"] in ("negative", "neutral", "positive"), reply.text


def answers_across_a_stop(container, stop, count: int = 6, model: str = "densenet161"):
    """``count`` requests to the slowest model in flight, then ``stop`` (blocking, in a thread);
    returns the replies and how many were answered after the stop began."""
    container.keys()  # read before the requests go
    body, content_type = sample(model)
    finished: list[float] = []

    def post():
        reply = container.post(model, body, content_type, timeout=180)
        finished.append(time.monotonic())
        return reply

    with ThreadPoolExecutor(count) as pool:
        replies = [pool.submit(post) for _ in range(count)]
        time.sleep(0.3)
        stopping = time.monotonic()
        stopper = threading.Thread(target=stop)
        stopper.start()
        answered = [reply.result() for reply in replies]
        stopper.join()
    return answered, sum(1 for moment in finished if moment > stopping)


# --- Kubernetes: deploy/k8s/base under podman kube play ---------------------------------------------


class PodContainer(RunningImage):
    """A container that ``podman kube play`` started, reached at its pod's IP on podman's bridge
    (as a Service reaches a pod), on the container ports themselves."""

    def __init__(self, engine: image.Podman, name: str, pod: str):
        self.engine, self.name, self.pod = engine, name, pod
        self.key_files: dict[str, dict] = {}
        infra = engine.output("pod", "inspect", "--format", "{{.InfraContainerID}}", pod)
        self.ip = engine.output("inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", infra)

    def url(self, api: str, path: str) -> str:
        return f"http://{self.ip}:{INSIDE_PORTS[api]}/{path}"


def render_for_podman(folder: Path, tag: str) -> tuple[dict, list[Path]]:
    """deploy/k8s/base rendered by kubectl kustomize through an overlay (the local image, 1 CPU per
    replica: this machine has 2), then one manifest per replica for what podman 4.3.1 does unlike a
    kubelet: it publishes every containerPort on the host's 0.0.0.0 (two replicas clash; pods are
    reached at their IPs instead, as a Service reaches them), and it makes each emptyDir a named
    volume shared by every pod that names it (so each replica is played as its own Deployment of
    one, its volumes named after it). Returns the rendered Deployment and the manifests."""
    overlay = folder / "overlay"
    overlay.mkdir()
    name, _, version = tag.rpartition(":")
    cpu = [{"op": "replace", "path": f"/spec/template/spec/containers/0/resources/{kind}/cpu", "value": "1"}
           for kind in ("requests", "limits")]
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(DEPLOY_DIR / "k8s" / "base", overlay)],
        "images": [{"name": "graviton-serve", "newName": name, "newTag": version}],
        "patches": [{"target": {"kind": "Deployment"}, "patch": yaml.safe_dump(cpu)}]}))
    rendered = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    deployment = next(r for r in yaml.safe_load_all(rendered.stdout) if r["kind"] == "Deployment")
    manifests = []
    for replica in range(deployment["spec"]["replicas"]):
        played = copy.deepcopy(deployment)
        played["metadata"]["name"] = prefix = f"{KUBE_PREFIX}{replica}"
        played["spec"]["replicas"] = 1
        pod = played["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        del container["ports"]
        for volume in pod["volumes"] + container["volumeMounts"]:
            volume["name"] = f"{prefix}-{volume['name']}"
        manifests.append(folder / f"replica-{replica}.yaml")
        manifests[-1].write_text(yaml.safe_dump(played))
    return deployment, manifests


@pytest.fixture(scope="module")
def deployment(engine, tag, tmp_path_factory):
    """The rendered Deployment and its replicas' containers, each with its READY time since kube play."""
    spec, manifests = render_for_podman(tmp_path_factory.mktemp("k8s"), tag)
    played = time.monotonic()
    try:
        for manifest in manifests:
            engine.run("kube", "play", str(manifest), timeout=600)
        pods = engine.output("pod", "ps", "--format", "{{.Name}}", "--filter", f"name=^{KUBE_PREFIX}").split()
        pod_containers = [PodContainer(engine, f"{pod}-torchserve", pod) for pod in sorted(pods)]
        for container in pod_containers:
            container.wait_for_log("every model READY", timeout=900)
            container.ready_s = time.monotonic() - played
            print(f"{container.pod}: every model READY {container.ready_s:.0f} s after kube play (ip {container.ip})")
        yield spec, pod_containers
    finally:
        for manifest in manifests:
            engine.run("kube", "down", str(manifest), check=False, timeout=300)
        left = engine.output("ps", "--all", "--format", "{{.Names}}", "--filter", f"name=^{KUBE_PREFIX}")
        left += engine.output("pod", "ps", "--format", "{{.Name}}", "--filter", f"name=^{KUBE_PREFIX}")
        left += engine.output("volume", "ls", "--format", "{{.Name}}", "--filter", f"name={KUBE_PREFIX}")
        assert left == "", f"left behind: {left}"


def test_the_deployment_plays_one_hardened_pod_per_replica_that_answers(deployment, engine):
    spec, pods = deployment
    assert len(pods) == spec["spec"]["replicas"] == 2
    for pod in pods:
        assert_hardened(pod)
        assert status_lines(pod)["NoNewPrivs"] == "1"  # allowPrivilegeEscalation: false
        # The CPU limit (1) is the cgroup quota the worker's threads follow.
        tuning = pod.exec("grep", "-h", "tuning: device", f"{HOME}/run/logs/model_log.log").stdout.decode()
        mnist_line = next(line for line in tuning.splitlines() if "mnist: tuning:" in line)
        print(f"{pod.pod}: {mnist_line[mnist_line.index('mnist: tuning:'):][:120]}")
        # (MNIST's two workers share it: "1 usable CPUs (affinity and cgroup quota) shared by 2 workers")
        assert "threads=1 " in mnist_line and "(1 usable CPUs (affinity and cgroup quota)" in mnist_line
        # The liveness probe (a podman healthcheck) and the readiness probe's command both pass.
        assert engine.run("healthcheck", "run", pod.name, check=False, timeout=120).returncode == 0
        assert pod.exec(*spec["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
                        ).returncode == 0
        assert_answers_samples(pod)


def test_stopping_a_pod_answers_its_requests_in_flight(deployment, engine):
    spec, pods = deployment
    pod = pods[-1]
    grace = spec["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]  # podman 4.3.1 does not read it

    def stop() -> None:
        # As a kubelet stops a pod: its containers first (SIGTERM, up to the grace period), then the
        # sandbox. (`podman pod stop` stops the infra container alongside, taking the pod's network
        # away while the drain is still answering.)
        engine.run("stop", "--time", str(grace), pod.name, timeout=grace + 60)
        engine.run("pod", "stop", pod.pod, timeout=120)

    answered, after_stop = answers_across_a_stop(pod, stop)
    assert [reply.status_code for reply in answered] == [200] * len(answered)
    assert after_stop > 0, "no request was still in flight when the stop began"
    assert pod.state("ExitCode") == "0"
    drain = [line for line in pod.logs().splitlines() if "drain" in line]
    print(f"pod stop -t {grace}: {after_stop} of {len(answered)} answered after the stop began; {drain}")
    assert any("drained: every request answered" in line for line in drain)


# --- KServe: the ServingRuntime's container with KServe's storage layout ------------------------------


def kserve_storage(folder: Path) -> Path:
    """KServe's /mnt/models: config/config.properties (deploy/kserve's, its snapshot cut to
    KSERVE_MODELS) and model-store/ with those archives."""
    folder.chmod(0o755)  # readable by the container's uid 1000, as KServe's storage initializer leaves it
    (folder / "config").mkdir(mode=0o755, parents=True)
    (folder / "model-store").mkdir(mode=0o755)
    properties = read_properties(DEPLOY_DIR / "kserve" / "config" / "config.properties")
    snapshot = json.loads(properties["model_snapshot"])
    snapshot["models"] = {name: snapshot["models"][name] for name in KSERVE_MODELS}
    snapshot["modelCount"] = len(KSERVE_MODELS)
    properties["model_snapshot"] = json.dumps(snapshot)
    write_properties(folder / "config" / "config.properties", properties)
    for name in KSERVE_MODELS:
        shutil.copy2(MODEL_STORE / f"{name}.mar", folder / "model-store")
    return folder


@pytest.fixture(scope="module")
def kserve(containers, tmp_path_factory):
    """Two runtime containers, as KServe starts them for protocolVersion v1 and v2."""
    storage = kserve_storage(tmp_path_factory.mktemp("kserve"))
    runtime = yaml.safe_load((DEPLOY_DIR / "kserve" / "servingruntime.yaml").read_text())
    started = {}
    for protocol, envelope in (("v1", "kserve"), ("v2", "kservev2")):
        arguments, ports = serving_runtime_arguments(runtime, {"serviceEnvelope": envelope})
        assert ports == [INSIDE_PORTS["inference"]]  # KServe's ModelServer REST port
        started[protocol] = containers(f"kserve-{protocol}", *arguments, f"--volume={storage}:/mnt/models:ro",
                                       hardening=())
    for protocol, container in started.items():
        container.wait_for_log("KServe ModelServer started", timeout=600)
        for _ in range(120):
            try:
                if requests.get(container.url("inference", "v2/health/ready"), timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            container.assert_not_exited()
            time.sleep(1)
        else:
            raise AssertionError(f"KServe {protocol} not ready:\n{container.logs()[-3000:]}")
    return started


def grpc_v2_call(url: str, model: str, request_id: str, *texts: str) -> subprocess.CompletedProcess:
    """tests/kserve_grpc_call.py (KServe's own gRPC client) run by the KServe SDK's Python."""
    return subprocess.run([str(kserve_python()), str(TESTS / "kserve_grpc_call.py"), url, model, request_id, *texts],
                          capture_output=True, text=True, timeout=180)


def post_json(url: str, body) -> requests.Response:
    return requests.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=120)


def test_kserve_v1_answers_each_instance_in_place(kserve):
    container = kserve["v1"]
    assert_hardened(container)
    url = lambda model: container.url("inference", f"v1/models/{model}:predict")  # noqa: E731
    digit = post_json(url("mnist"), {"instances": [{"data": DIGIT}, {"data": "not an image"}, {"data": DIGIT}]})
    print(f"KServe v1 mnist: {digit.status_code} {digit.text[:400]}")
    first, bad, third = digit.json()["predictions"]
    assert next(iter(first)) == "7" and next(iter(third)) == "7"
    assert bad["code"] == 400 and bad["type"] == "BadInput"
    text = post_json(url("bert_sentiment"), {"instances": [{"data": "The service was quick and friendly."},
                                                          {"data": " \u200b "}]})
    print(f"KServe v1 bert_sentiment: {text.status_code} {text.text[:400]}")
    sentence, blank = text.json()["predictions"]
    assert sentence["label"] in ("negative", "neutral", "positive") and blank["type"] == "BadInput"
    # As curl -d sends it (a form's content type): read as the JSON it is.
    form = requests.post(url("bert_sentiment"), data=json.dumps({"instances": [{"data": "What a lovely day"}]}),
                         headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=120)
    assert form.status_code == 200 and form.json()["predictions"][0]["label"] in ("negative", "neutral", "positive")
    for malformed in ({"instances": "not a list"}, {"instances": []}, {"inputs": [DIGIT]}):
        refused = post_json(url("mnist"), malformed)
        assert refused.status_code == 400 and "instances" in refused.json()["error"], refused.text
    other_protocol = post_json(container.url("inference", "v2/models/mnist/infer"), {"inputs": [
        {"name": "digit", "shape": [1], "datatype": "BYTES", "data": [DIGIT]}]})
    assert other_protocol.status_code == 400 and "protocol v1" in other_protocol.json()["error"]
    assert requests.get(container.url("inference", "v1/models/nope"), timeout=30).status_code == 404
    assert requests.get(container.url("inference", "v1/models/mnist"), timeout=30).json() == {"name": "mnist",
                                                                                                  "ready": True}


def test_kserve_v2_over_rest_and_grpc_answers_each_input_as_json_text(kserve):
    container = kserve["v2"]
    body = {"id": "request-1", "inputs": [{"name": "digit", "shape": [1], "datatype": "BYTES", "data": [DIGIT]},
                                          {"name": "junk", "shape": [1], "datatype": "BYTES", "data": ["junk"]}]}
    rest = post_json(container.url("inference", "v2/models/mnist/infer"), body)
    print(f"KServe v2 REST mnist: {rest.status_code} {rest.text[:500]}")
    assert rest.status_code == 200 and rest.json()["id"] == "request-1"
    digit, junk = rest.json()["outputs"]
    assert digit["name"] == "digit" and digit["datatype"] == "BYTES"
    assert next(iter(json.loads(digit["data"][0]))) == "7"
    assert json.loads(junk["data"][0])["code"] == 400
    # A BYTES tensor of three texts: each answered in its place, the empty one with its error.
    text = post_json(container.url("inference", "v2/models/bert_sentiment/infer"), {"inputs": [
        {"name": "reviews", "shape": [3], "datatype": "BYTES",
         "data": ["Terrible service, I want a refund.", "", "Lovely staff and a great view."]}]})
    print(f"KServe v2 REST bert_sentiment: {text.status_code} {text.text[:500]}")
    (reviews,) = text.json()["outputs"]
    assert reviews["name"] == "reviews" and reviews["shape"] == [3]
    first, empty, third = (json.loads(element) for element in reviews["data"])
    assert first["label"] in ("negative", "neutral", "positive") and third["label"] in ("negative", "neutral", "positive")
    assert empty["type"] == "BadInput"
    for malformed, named in (({"inputs": []}, "no inputs"),
                             ({"inputs": [{"name": "n", "shape": [1], "datatype": "INT32", "data": ["a"]}]}, "'n'"),
                             ({"instances": [DIGIT]}, "protocol v2")):
        refused = post_json(container.url("inference", "v2/models/mnist/infer"
                                          if "inputs" in malformed else "v1/models/mnist:predict"), malformed)
        assert refused.status_code == 400 and named in refused.json()["error"], refused.text
    # gRPC v2 on the ModelServer's gRPC port (8081, published as the "management" port), with KServe's own client.
    grpc_url = f"127.0.0.1:{container.ports.management}"
    called = grpc_v2_call(grpc_url, "bert_sentiment", "grpc-1", "What a lovely day", "")
    print(f"KServe gRPC v2 bert_sentiment: {called.stdout.strip()[:500]}")
    assert called.returncode == 0, called.stdout + called.stderr[-2000:]
    reply = json.loads(called.stdout)
    assert reply["id"] == "grpc-1" and [output["name"] for output in reply["outputs"]] == ["in0", "in1"]
    sentence, empty = (json.loads(output["data"][0]) for output in reply["outputs"])
    assert sentence["label"] in ("negative", "neutral", "positive") and empty["type"] == "BadInput"
    image = grpc_v2_call(grpc_url, "mnist", "grpc-2", DIGIT, "not an image")
    print(f"KServe gRPC v2 mnist: {image.stdout.strip()[:300]}")
    digit, junk = (json.loads(output["data"][0]) for output in json.loads(image.stdout)["outputs"])
    assert next(iter(digit)) == "7" and junk["type"] == "BadInput"


def test_kserve_runtime_stop_answers_the_requests_in_flight_through_the_model_server(kserve, engine):
    """SIGTERM reaches the runtime (PID 1): TorchServe drains while KServe's ModelServer keeps
    forwarding, then the ModelServer stops; the container exits 0."""
    container = kserve["v1"]
    sentence = "The train was late again, but the staff were kind and the coffee was good. " * 6
    body = {"instances": [{"data": f"{index}: {sentence}"} for index in range(120)]}
    url = container.url("inference", "v1/models/bert_sentiment:predict")
    with ThreadPoolExecutor(3) as pool:
        replies = [pool.submit(post_json, url, body) for _ in range(3)]
        time.sleep(0.3)
        engine.run("stop", "--time", "60", container.name, timeout=180)
        answered = [reply.result() for reply in replies]
    assert [reply.status_code for reply in answered] == [200] * 3
    assert all(len(reply.json()["predictions"]) == 120 for reply in answered)
    assert container.state("ExitCode") == "0", container.logs()[-2000:]
    stopping = [line for line in container.logs().splitlines() if "drain" in line or "exits with" in line]
    print(f"KServe runtime stop: {stopping}")
    assert any("drained: every request answered" in line for line in stopping)


# --- ECS: task-cpu.json's container, mapped to podman run ------------------------------------------------


@pytest.fixture
def ecs_volumes(engine):
    prefix = f"{NAME_PREFIX}ecs-"
    yield prefix
    for volume in engine.output("volume", "ls", "--format", "{{.Name}}", "--filter", f"name={prefix}").split():
        engine.run("volume", "rm", "--force", volume, check=False, timeout=120)


def test_the_ecs_task_container_runs_as_declared_and_drains_on_stop(containers, engine, ecs_volumes):
    task = json.loads((DEPLOY_DIR / "ecs" / "task-cpu.json").read_text())
    arguments, ports, ecs_only = ecs_run_arguments(task, ecs_volumes)
    assert sorted(ports) == sorted(INSIDE_PORTS.values())
    print("ECS task-cpu.json as podman run flags: " + " ".join(arguments))
    print("ECS only (not proven here): " + "; ".join(f"{key}: {why}" for key, why in ecs_only.items()))
    container = containers("ecs", *arguments, hardening=())
    print(f"ECS container: every model READY {container.wait_for_log('every model READY', timeout=900):.0f} s after podman run")
    assert_hardened(container)
    assert engine.output("inspect", "--format", "{{.Config.StopTimeout}}", container.name) == str(task["containerDefinitions"][0]["stopTimeout"])
    assert engine.run("healthcheck", "run", container.name, check=False, timeout=120).returncode == 0
    assert_answers_samples(container)
    stop = lambda: engine.run("stop", container.name, timeout=300)  # noqa: E731  (its own stop timeout)
    answered, after_stop = answers_across_a_stop(container, stop)
    assert [reply.status_code for reply in answered] == [200] * len(answered)
    assert after_stop > 0, "no request was still in flight when the stop began"
    assert container.state("ExitCode") == "0", container.logs()[-2000:]
    print(f"podman stop (stopTimeout): {after_stop} of {len(answered)} answered after the stop began")
