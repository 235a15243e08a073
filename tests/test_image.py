"""The container image itself (localhost/graviton-serve:cpu, built by scripts/test from docker/Dockerfile),
run by podman the way a careful user runs it: uid 1000, read-only root, tmpfs for run state, every
capability dropped, ports published on loopback only. Called from the host over REST and gRPC and
compared with a host-side TorchServe over the same archives; probed, drained and stopped.

Needs root and podman (installed by scripts/test where apt-get can): elsewhere one skip reason."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

from graviton_serve import image
from graviton_serve.families import of_archive
from graviton_serve.grpc_client import GrpcClient
from graviton_serve.paths import MODEL_STORE
from graviton_serve.torchserve_config import Ports
from tests.conftest import ServerUnderTest, slow_archive
from tests.raw_http import answer_and_whether_closed, pipelined
from tests.realworld_inputs import good_png

REASON = image.unavailable_reason()
pytestmark = [pytest.mark.integration, pytest.mark.container,
              pytest.mark.skipif(REASON is not None, reason=f"container image tests: {REASON}")]

HOME = "/home/model-server"
INSIDE_PORTS = {"inference": 8080, "management": 8081, "metrics": 8082, "grpc_inference": 7070,
                "grpc_management": 7071}
NAME_PREFIX = f"gs-test-{os.getpid()}-"  # two suites on one machine never touch each other's
# The host-side reference: one archive per family (the container serves every demo model).
COMPARED = ["mnist", "bert_sentiment", "bert_fill_mask", "resnet50"]


HARDENED = ("--user=1000:1000", "--read-only", "--tmpfs=/tmp:rw,mode=1777", f"--tmpfs={HOME}/run:rw,mode=0700,U",
            "--cap-drop=ALL", "--security-opt=no-new-privileges")


class RunningImage:
    """One ``podman run -d`` of the image: ``hardening`` (default: the careful user's flags), then
    ``extra``; the five ports published on free loopback ports."""

    def __init__(self, engine: image.Podman, tag: str, name: str, *extra: str, command: tuple[str, ...] = (),
                 hardening: tuple[str, ...] = HARDENED):
        self.engine, self.name = engine, f"{NAME_PREFIX}{name}"
        self.key_files: dict[str, dict] = {}
        self.ports = Ports.free()
        engine.run("rm", "--force", "--ignore", self.name)
        publish = [f"--publish=127.0.0.1:{getattr(self.ports, api)}:{port}" for api, port in INSIDE_PORTS.items()]
        engine.run("run", "--detach", "--name", self.name, *hardening, *publish, *extra, tag, *command, timeout=120)

    def logs(self) -> str:
        result = self.engine.run("logs", self.name, check=False, timeout=60)
        return (result.stdout + result.stderr).decode(errors="replace")

    def state(self, field: str) -> str:
        return self.engine.output("inspect", "--format", f"{{{{.State.{field}}}}}", self.name)

    def wait_for_log(self, line: str, timeout: float = 400) -> float:
        """Seconds until ``line`` shows in the container's output (it must keep running)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if line in self.logs():
                return time.monotonic() - started
            self.assert_not_exited()
            time.sleep(1)
        raise AssertionError(f"no {line!r} in {timeout}s:\n{self.logs()[-3000:]}")

    def assert_not_exited(self) -> None:
        status = self.state("Status")
        assert status not in ("exited", "stopped", "dead"), (
            f"container {status}, exit code {self.state('ExitCode')}:\n{self.logs()[-3000:]}")

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        return self.engine.run("exec", self.name, *command, check=False, timeout=120)

    def keys(self, key_file: str = f"{HOME}/run/key_file.json") -> dict:
        """The container's key file (made at start, fixed for its life): read once through podman exec."""
        if key_file not in self.key_files:
            result = self.exec("cat", key_file)
            assert result.returncode == 0, result.stderr
            self.key_files[key_file] = json.loads(result.stdout)
        return self.key_files[key_file]

    def url(self, api: str, path: str) -> str:
        return f"http://127.0.0.1:{getattr(self.ports, api)}/{path}"

    def auth(self, api: str = "inference") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys()[api]['key']}"}

    def post(self, model: str, body: bytes, content_type: str | None = None, timeout: float = 120) -> requests.Response:
        headers = {**self.auth(), **({"Content-Type": content_type} if content_type else {})}
        return requests.post(self.url("inference", f"predictions/{model}"), data=body, headers=headers,
                             timeout=timeout)

    def worker_pids(self, model: str) -> list[int]:
        reply = requests.get(self.url("management", f"models/{model}"), headers=self.auth("management"), timeout=30)
        assert reply.status_code == 200, reply.text
        return sorted(worker["pid"] for worker in reply.json()[0]["workers"])

    def remove(self) -> None:
        self.engine.run("rm", "--force", "--time", "5", "--ignore", self.name, check=False, timeout=120)


@pytest.fixture(scope="module")
def engine() -> image.Podman:
    podman = image.Podman()
    podman.ensure()
    return podman


@pytest.fixture(scope="module")
def tag(engine) -> str:
    """The image, as scripts/test built it; rebuilt here from cached layers if the code moved since."""
    return image.build(engine=engine)


@pytest.fixture(scope="module")
def containers(engine, tag):
    """Start containers through this; at teardown each is removed, and nothing of ours may be left."""
    started: list[RunningImage] = []

    def start(name: str, *extra: str, command: tuple[str, ...] = (), hardening: tuple[str, ...] = HARDENED) -> RunningImage:
        started.append(RunningImage(engine, tag, name, *extra, command=command, hardening=hardening))
        return started[-1]

    yield start
    for container in started:
        container.remove()
    left = engine.output("ps", "--all", "--format", "{{.Names}}", "--filter", f"name=^{NAME_PREFIX}")
    assert left == "", f"containers left behind: {left}"
    conmons = [p.pid for p in psutil.process_iter(["name", "cmdline"])
               if p.info["name"] == "conmon" and any(NAME_PREFIX in part for part in p.info["cmdline"] or [])]
    assert conmons == [], f"conmon processes left behind: {conmons}"


@pytest.fixture(scope="module")
def served(containers):
    """The image as it ships: every demo model, token auth on."""
    container = containers("served")
    container.ready_s = container.wait_for_log("every model READY")
    print(f"container: every model READY {container.ready_s:.0f} s after podman run")
    return container


@pytest.fixture(scope="module")
def host_server(tmp_path_factory):
    under_test = ServerUnderTest(tmp_path_factory.mktemp("ts_host"), [MODEL_STORE / f"{m}.mar" for m in COMPARED])
    server = under_test.start()
    yield server
    under_test.stop()


def sample(model: str) -> tuple[bytes, str]:
    request = of_archive(MODEL_STORE / f"{model}.mar").sample
    return request.body(), request.content_type


def assert_close(got, want, path="$", tolerance=1e-4):
    """Same JSON shape, strings and ints; floats within ``tolerance`` (thread counts may differ)."""
    if isinstance(want, float):
        assert isinstance(got, (int, float)) and abs(got - want) <= tolerance, f"{path}: {got} vs {want}"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{path}: keys {sorted(got)} vs {sorted(want)}"
        for key in want:
            assert_close(got[key], want[key], f"{path}.{key}", tolerance)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{path}: {got} vs {want}"
        for index, (a, b) in enumerate(zip(got, want)):
            assert_close(a, b, f"{path}[{index}]", tolerance)
    else:
        assert got == want, f"{path}: {got!r} vs {want!r}"


def top_answer(body):
    """The best label of an answer: a classifier's ``label``, an image classifier's first key
    (highest first), fill-mask's first ``token_str``."""
    if isinstance(body, dict):
        return body.get("label", next(iter(body)))
    first = body[0]
    return first.get("token_str", first) if isinstance(first, dict) else first


def chosen_precision(url: str, headers: dict) -> str:
    """What the model's worker serves in (describe's serving.precision): auto decides it by timing at start."""
    metadata = requests.get(url, headers=headers, timeout=60).json()[0]["customizedMetadata"]
    return (json.loads(metadata) if isinstance(metadata, str) else metadata)["serving"]["precision"]


def test_runs_as_uid_1000_on_a_read_only_root_with_no_capabilities(served, engine):
    status = served.exec("cat", "/proc/1/status").stdout.decode()
    assert re.search(r"^Uid:\s+1000\s", status, re.M), status
    assert re.search(r"^CapEff:\s+0+$", status, re.M) and re.search(r"^CapBnd:\s+0+$", status, re.M), status
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
    write = served.exec("touch", f"{HOME}/model-store/x")
    assert write.returncode != 0 and b"Read-only file system" in write.stderr
    assert engine.output("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", served.name) == "true"
    # The image's own declarations, as docker/Dockerfile makes them (built with --format docker).
    (inspected,) = json.loads(engine.output("image", "inspect", image.image_tag()))
    assert inspected["Config"]["User"] == "1000:1000"
    assert inspected["Config"]["Entrypoint"] == ["python", "-m", "graviton_serve.container"]
    assert inspected["Healthcheck"]["Test"] == ["CMD", "python", "-m", "graviton_serve.container", "--live"]


def test_every_demo_model_answers_as_the_host_side_server_does(served, host_server):
    names = sorted(path.stem for path in MODEL_STORE.glob("*.mar"))
    assert names == sorted(["mnist", "bert_sentiment", "roberta_sentiment", "bert_fill_mask", "roberta_fill_mask",
                            "resnet50", "densenet161", "efficientnet_lite0"])
    for model in names:
        body, content_type = sample(model)
        reply = served.post(model, body, content_type)
        assert reply.status_code == 200, f"{model}: {reply.status_code} {reply.text[:300]}"
        if model in COMPARED:
            host_reply = requests.post(host_server.url("inference", f"predictions/{model}"), data=body,
                                       headers={**host_server.auth(), "Content-Type": content_type}, timeout=120)
            assert host_reply.status_code == 200, host_reply.text
            described = f"models/{model}?customized=true"
            precisions = (chosen_precision(served.url("management", described), served.auth("management")),
                          chosen_precision(host_server.url("management", described), host_server.auth("management")))
            if precisions[0] == precisions[1]:
                assert_close(reply.json(), host_reply.json(), model)
            else:  # auto times int8 against fp32 at each start: the two starts may choose differently
                assert top_answer(reply.json()) == top_answer(host_reply.json()), model
            print(f"{model} (container {precisions[0]}, host {precisions[1]}):\n  container {reply.text[:150]}\n"
                  f"  host      {host_reply.text[:150]}")


def test_pipelined_requests_are_answered_in_order_and_http10_closed(served):
    # the HTTP front inside the image: densenet161 (slowest) first, mnist's answers must wait for it
    token = served.keys()["inference"]["key"]
    models = ["densenet161", "mnist", "resnet50", "mnist"]
    sent = [f"POST /predictions/{model} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            for model, body in zip(models, [good_png(), good_png(28), good_png(), good_png(28)])]
    answers = [json.loads(body) for body in pipelined(served.ports.inference, sent)]
    assert [all(label.isdigit() for label in answer) for answer in answers] == [False, True, False, True], answers
    http10 = sent[1].replace(b"HTTP/1.1", b"HTTP/1.0")
    status, _, closed = answer_and_whether_closed(served.ports.inference, http10)
    assert status == 200 and closed


def test_grpc_from_the_host_gives_the_rest_answer(served):
    keys = served.keys()
    with GrpcClient(inference_port=served.ports.grpc_inference, management_port=served.ports.grpc_management,
                    inference_token=keys["inference"]["key"], management_token=keys["management"]["key"],
                    timeout=120) as client:
        assert json.loads(client.ping()) == {"status": "Healthy"}
        assert {model["modelName"] for model in client.list_models()["models"]} >= set(COMPARED)
        for model in COMPARED:
            body, content_type = sample(model)
            over_grpc = json.loads(client.predict(model, {"data": body}))
            over_rest = served.post(model, body, content_type).json()
            assert_close(over_grpc, over_rest, model)


def test_probes_token_and_listeners(served, engine):
    assert engine.run("healthcheck", "run", served.name, check=False, timeout=120).returncode == 0
    assert served.exec("python", "-m", "graviton_serve.container", "--ready").returncode == 0
    # Token auth is on: no token, no answer (TorchServe 0.12 answers 400 here).
    anonymous = requests.post(served.url("inference", "predictions/mnist"), data=b"x", timeout=30)
    assert anonymous.status_code == 400 and "Token Authorization failed" in anonymous.text
    # The model API is off: registering a model is refused even with the management token.
    register = requests.post(served.url("management", "models?url=mnist.mar"), headers=served.auth("management"),
                             timeout=30)
    assert register.status_code >= 400, register.text
    metrics = requests.get(served.url("metrics", "metrics"), timeout=30)
    assert metrics.status_code == 200 and "ts_inference_requests_total" in metrics.text


def test_bad_input_is_a_4xx_for_that_request_and_the_worker_stays_up(served):
    before = served.worker_pids("resnet50")
    for body, content_type in ((b"\x89PNG\r\n\x1a\n truncated", "image/png"), (b"", None), (b"{}", "application/json")):
        reply = served.post("resnet50", body, content_type)
        assert 400 <= reply.status_code < 500, f"{body!r}: {reply.status_code} {reply.text[:200]}"
        assert set(reply.json()) == {"code", "type", "message"}
    text = served.post("bert_sentiment", "\ud800 unpaired".encode("utf-8", "surrogatepass"), "text/plain")
    assert text.status_code in (200, 400), text.text
    body, content_type = sample("resnet50")
    assert served.post("resnet50", body, content_type).status_code == 200
    assert served.worker_pids("resnet50") == before


def drain_with_requests_in_flight(container: RunningImage, send_sigterm, while_draining=lambda: None):
    """Four requests of 1.5 s each (one at a time in the worker: ~6 s of work) in flight, then
    ``send_sigterm``; returns the replies, what ``while_draining`` returned and the exit code."""
    container.keys()  # read before the requests go, so that all four are in flight at the signal
    with ThreadPoolExecutor(4) as pool:
        replies = [pool.submit(container.post, "slow", b"15") for _ in range(4)]
        time.sleep(1.0)
        stopper = threading.Thread(target=send_sigterm)
        stopper.start()
        time.sleep(1.0)
        seen = while_draining()
        answered = [reply.result() for reply in replies]
        stopper.join()
    container.engine.run("wait", container.name, timeout=120)
    return answered, seen, container.state("ExitCode")


@pytest.fixture
def slow_store(tmp_path) -> Path:
    store = tmp_path / "store"
    slow_archive(store, tmp_path)
    return store


def test_podman_stop_answers_the_requests_in_flight_then_exits_0(containers, slow_store):
    container = containers("drain", f"--volume={slow_store}:{HOME}/model-store:ro", "--env=GS_DRAIN_TIMEOUT_S=50")
    container.wait_for_log("every model READY", timeout=180)
    stop = lambda: container.engine.run("stop", "--time", "60", container.name, timeout=120)  # noqa: E731
    answered, _, exit_code = drain_with_requests_in_flight(container, stop)
    assert [reply.status_code for reply in answered] == [200] * 4
    assert all(reply.json() == {"slept_tenths": 15} for reply in answered)
    assert exit_code == "0", container.logs()[-2000:]
    drain_lines = [line for line in container.logs().splitlines() if "drain" in line or "TorchServe stopped" in line]
    print("podman stop -t 60:\n" + "\n".join(drain_lines))
    assert any("drained: every request answered" in line for line in drain_lines)


def test_the_readiness_probe_fails_while_draining(containers, slow_store):
    """``podman stop`` refuses ``exec`` while it stops a container, so here SIGTERM comes from
    ``podman kill``: what a Kubernetes kubelet does before it probes during the grace period."""
    container = containers("probe", f"--volume={slow_store}:{HOME}/model-store:ro", "--env=GS_DRAIN_TIMEOUT_S=50")
    container.wait_for_log("every model READY", timeout=180)
    assert container.exec("python", "-m", "graviton_serve.container", "--ready").returncode == 0
    sigterm = lambda: container.engine.run("kill", "--signal", "TERM", container.name)  # noqa: E731
    probe = lambda: container.exec("python", "-m", "graviton_serve.container", "--ready")  # noqa: E731
    answered, probed, exit_code = drain_with_requests_in_flight(container, sigterm, probe)
    assert probed.returncode == 1 and b"draining" in probed.stderr, probed
    assert [reply.status_code for reply in answered] == [200] * 4
    assert exit_code == "0", container.logs()[-2000:]


def test_the_stock_torchserve_start_serves_in_the_same_image(containers):
    """AWS's users start TorchServe themselves: ``torchserve --start --ts-config ... --models ...``."""
    container = containers("stock", f"--workdir={HOME}/run", "--entrypoint=torchserve",
                           command=("--start", "--foreground", "--ts-config", f"{HOME}/config.properties",
                                    "--models", "mnist=mnist.mar"))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        keys = container.exec("cat", f"{HOME}/run/key_file.json")
        if keys.returncode == 0:
            try:
                reply = requests.get(container.url("management", "models/mnist"), timeout=30, headers={
                    "Authorization": f"Bearer {json.loads(keys.stdout)['management']['key']}"})
            except requests.ConnectionError:  # the key file is written before the listeners open
                reply = None
            if reply is not None and reply.status_code == 200 and reply.json()[0]["workers"][0]["status"] == "READY":
                break
        container.assert_not_exited()
        time.sleep(2)
    else:
        raise AssertionError(f"stock start not ready in 180 s:\n{container.logs()[-3000:]}")
    body, content_type = sample("mnist")
    reply = container.post("mnist", body, content_type)
    assert reply.status_code == 200, reply.text
    scores = reply.json()
    assert max(scores, key=scores.get) == "7", scores  # tests/data/digit.png is a 7
