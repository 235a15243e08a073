"""The same archives on Ray Serve (graviton_serve.ray_front), on a real two-node Ray cluster.

A head and a worker node are started on this machine, each with its own CPU budget (1 CPU) and
ports, token auth on, and stopped by the test's own process ids. mnist runs two replicas that
need one CPU each, so Ray must place one on each node; bert_sentiment one replica anywhere.
The answers are compared with a real TorchServe's for the same requests (same archives, same
threads, the same precision outcome: the Ray replicas read the TorchServe run's kept timing).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import requests

pytest.importorskip("ray", reason="the 'ray' extra is not installed (pip install -e '.[ray]'; scripts/test installs it)")

from starlette.datastructures import Headers  # noqa: E402 - needs the extra, checked above

from graviton_serve import ray_cluster  # noqa: E402
from graviton_serve.demo_store import build_demo_store  # noqa: E402
from graviton_serve.paths import MODEL_STORE  # noqa: E402
from graviton_serve.ray_front import torchserve_request  # noqa: E402
from graviton_serve.ray_server import RayServer  # noqa: E402
from graviton_serve.torchserve_config import free_loopback_ports  # noqa: E402
from handlers.launch import launch_environment  # noqa: E402
from handlers.tuning import usable_cpus  # noqa: E402
from tests.conftest import ServerUnderTest  # noqa: E402

MODELS = ["mnist", "bert_sentiment"]
DIGIT = (Path(__file__).parent / "data" / "digit.png").read_bytes()
MAX_REQUEST_BYTES = 16 << 20


def multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "gsboundary") -> tuple[bytes, str]:
    """A multipart/form-data body: (name, value, content type or None for a plain field)."""
    out = io.BytesIO()
    for name, value, content_type in parts:
        out.write(f"--{boundary}\r\n".encode())
        if content_type is None:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        else:
            out.write(f'Content-Disposition: form-data; name="{name}"; filename="{name}.bin"\r\n'
                      f"Content-Type: {content_type}\r\n\r\n".encode())
        out.write(value + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def _same_requests() -> list[tuple[str, str, bytes, dict]]:
    """(label, model, body, headers): real inputs of each shape the input contract names, good and bad."""
    upload, upload_type = multipart([("image", DIGIT, "image/png"), ("top_k", b"2", None)])
    sentence = "I love riding in self-driving cars!"
    return [
        ("png raw", "mnist", DIGIT, {"Content-Type": "application/octet-stream"}),
        ("png no type", "mnist", DIGIT, {}),
        ("multipart + top_k", "mnist", upload, {"Content-Type": upload_type}),
        ("json base64", "mnist", json.dumps({"image": base64.b64encode(DIGIT).decode(), "top_k": 3}).encode(),
         {"Content-Type": "application/json"}),
        ("gzip png", "mnist", gzip.compress(DIGIT), {"Content-Type": "image/png", "Content-Encoding": "gzip"}),
        ("not an image", "mnist", b"hello", {"Content-Type": "application/octet-stream"}),
        ("empty", "mnist", b"", {"Content-Type": "application/octet-stream"}),
        ("text plain", "bert_sentiment", sentence.encode(), {"Content-Type": "text/plain; charset=utf-8"}),
        ("json text", "bert_sentiment", json.dumps({"text": "The food was cold and the waiter rude."}).encode(),
         {"Content-Type": "application/json"}),
        ("form field text", "bert_sentiment", b"text=it+was+fine", {"Content-Type": "application/x-www-form-urlencoded"}),
        ("form without text", "bert_sentiment", b"review=great", {"Content-Type": "application/x-www-form-urlencoded"}),
        ("invalid json", "bert_sentiment", b'{"text": ', {"Content-Type": "application/json"}),
        ("brotli", "bert_sentiment", b"x", {"Content-Type": "text/plain", "Content-Encoding": "br"}),
        ("latin-1 bytes", "bert_sentiment", "café".encode("latin-1"), {"Content-Type": "text/plain"}),
        ("whitespace only", "bert_sentiment", "\u200b \n".encode(), {"Content-Type": "text/plain"}),
    ]


SAME_REQUESTS = _same_requests()
# (label, method, path, body, with the key): what TorchServe's frontend and HTTP front answer themselves
SAME_EDGE_REQUESTS = [
    ("ping", "GET", "ping", b"", True),
    ("ping without the key", "GET", "ping", b"", False),
    ("unknown model", "POST", "predictions/resnet50", DIGIT, True),
    ("unknown model without the key", "POST", "predictions/resnet50", DIGIT, False),
    ("over max_request_size without the key", "POST", "predictions/mnist", b"\0" * (MAX_REQUEST_BYTES + 1), False),
    ("the archive's version", "POST", "predictions/mnist/1.0", DIGIT, True),
]


def ask_edge(base_url: str, key: str, method: str, path: str, body: bytes, with_key: bool) -> tuple[int, object]:
    reply = requests.request(method, f"{base_url}/{path}", data=body, timeout=120,
                             headers={"Authorization": f"Bearer {key}"} if with_key else {})
    return reply.status_code, reply.json()


def ask(base_url: str, key: str, model: str, body: bytes, headers: dict, timeout: float = 120) -> requests.Response:
    return requests.post(f"{base_url}/predictions/{model}", data=body, timeout=timeout,
                         headers={**headers, "Authorization": f"Bearer {key}"})


# -- what TorchServe's frontend makes of a request, without a cluster --------------------------------

def _convert(body: bytes, content_type: str) -> tuple[dict, dict]:
    return asyncio.run(torchserve_request(Headers({"content-type": content_type, "content-length": str(len(body))}), body))


@pytest.mark.parametrize("content_type, body, expected", [
    ("application/json", b'{"text": "hi"}', {"text": "hi"}),  # exactly application/json is parsed
    ("application/json; charset=utf-8", b'{"a": 1}', {"a": 1}),  # the frontend passes the MIME type only
    ("application/json", b'{"a": ', b'{"a": '),  # invalid JSON stays bytes
    ("text/plain", "é".encode(), "é"),
    ("text/plain", b"\xff", b"\xff"),  # not UTF-8: bytes
    ("image/png", b"\x89PNG", b"\x89PNG"),
    ("", b"raw", b"raw"),
])
def test_a_body_becomes_the_part_body_decoded_as_torchserves_worker_decodes_it(content_type, body, expected):
    request, headers = _convert(body, content_type)
    assert request == {"body": expected}
    assert headers["body"] == {"content-type": content_type.split(";")[0]}
    assert headers["content-type"] == content_type


def test_multipart_and_form_bodies_become_one_part_per_field():
    body, content_type = multipart([("image", b"\x89PNG", "image/png"), ("top_k", b"2", None),
                                    ("meta", b'{"a": 1}', "application/json")])
    request, headers = _convert(body, content_type)
    assert request == {"image": b"\x89PNG", "top_k": b"2", "meta": {"a": 1}}
    assert headers["image"] == {"content-type": "image/png"} and headers["top_k"] == {"content-type": ""}
    request, _ = _convert(b"text=a+b&top_k=2", "application/x-www-form-urlencoded")
    assert request == {"text": b"a b", "top_k": b"2"}


def test_a_broken_multipart_body_is_a_value_error():
    with pytest.raises(ValueError):
        _convert(b"--x\r\nContent-Disposition: form-data\r\n\r\nno name\r\n--x--\r\n",
                       "multipart/form-data; boundary=x")


# -- a real two-node cluster ------------------------------------------------------------------------

def test_a_models_replicas_are_its_archives_workers_splitting_the_cpus_and_threads(mnist_mar, tmp_path):
    import zipfile

    import yaml

    one_worker = tmp_path / "one.mar"  # the same archive asking for one worker
    with zipfile.ZipFile(mnist_mar) as source, zipfile.ZipFile(one_worker, "w") as target:
        for entry in source.infolist():
            data = source.read(entry)
            if entry.filename == "model-config.yaml":
                data = yaml.safe_dump({**yaml.safe_load(data), "minWorkers": 1, "maxWorkers": 1}).encode()
            target.writestr(entry, data)
    apps = {app["name"]: app for app in ray_cluster.serve_config([mnist_mar, one_worker], 8080, None, 1 << 20,
                                                                  cpus_per_replica=1.0, threads=4)["applications"]}
    two, one = apps["mnist"], apps["one"]
    assert (two["deployments"][0]["num_replicas"], two["deployments"][0]["ray_actor_options"]["num_cpus"],
            two["runtime_env"]["env_vars"]["OMP_NUM_THREADS"]) == (2, 0.5, "2")
    assert (one["deployments"][0]["num_replicas"], one["deployments"][0]["ray_actor_options"]["num_cpus"],
            one["runtime_env"]["env_vars"]["OMP_NUM_THREADS"]) == (1, 1.0, "4")
    fixed = ray_cluster.serve_config([mnist_mar], 8080, None, 1 << 20, replicas=3)["applications"][1]
    assert fixed["deployments"][0]["num_replicas"] == 3 and "OMP_NUM_THREADS" not in fixed["runtime_env"]["env_vars"]


@pytest.fixture(scope="module")
def archives() -> list[Path]:
    return build_demo_store(MODEL_STORE, MODELS)


@pytest.fixture(scope="module")
def torchserve_answers(archives, tmp_path_factory):
    """TorchServe's answers to SAME_REQUESTS, and the folder where its workers kept auto's timing."""
    under_test = ServerUnderTest(tmp_path_factory.mktemp("ts_for_ray"), archives)
    server = under_test.start()
    try:
        key = json.loads(server.run_folder.key_file.read_text())["inference"]["key"]
        base = server.url("inference", "").rstrip("/")
        answers = {label: (reply.status_code, reply.json()) for label, model, body, headers in SAME_REQUESTS
                   for reply in [ask(base, key, model, body, headers)]}
        answers.update({label: ask_edge(base, key, *request) for label, *request in SAME_EDGE_REQUESTS})
    finally:
        under_test.stop()
    return answers, server.run_folder.precision_cache


class Cluster:
    def __init__(self, folder: Path, precision_cache: Path, archives: list[Path]):
        self.folder, self.archives = folder, archives
        self.token = ray_cluster.auth_token_file(folder)
        self.key_file = ray_cluster.write_key_file(folder / "key_file.json")
        self.key = json.loads(self.key_file.read_text())["inference"]["key"]
        self.port = free_loopback_ports(1)[0]
        self.base = f"http://127.0.0.1:{self.port}"
        self.precision_cache = precision_cache
        self.nodes: list[ray_cluster.RayNode] = []

    def start(self) -> None:
        self.head = ray_cluster.start_node(self.folder / "head", 1, self.token)
        self.nodes.append(self.head)
        self.worker = ray_cluster.start_node(self.folder / "worker", 1, self.token, self.head.head_address)
        self.nodes.append(self.worker)
        deadline = time.monotonic() + 60
        while len(ray_cluster.alive_nodes(self.head.dashboard_url, self.token)) < 2:
            assert time.monotonic() < deadline, "the worker node did not join the head"
            time.sleep(1)

    def config(self, mnist_replicas: int) -> dict:
        # TorchServe's worker threads on this machine, so the replicas find its kept precision outcome.
        environment = launch_environment({}, str(self.folder / "cores"), precision_cache_dir=str(self.precision_cache))
        config = ray_cluster.serve_config(self.archives, self.port, self.key_file, MAX_REQUEST_BYTES,
                                          cpus_per_replica=1, threads=usable_cpus(), environment=environment)
        for app in config["applications"]:
            if app["name"] == "mnist":
                app["deployments"][0]["num_replicas"] = mnist_replicas
                app["deployments"][0]["ray_actor_options"]["num_cpus"] = 1  # 1 CPU each: one per node
            elif app["name"] == "bert_sentiment":
                app["deployments"][0]["ray_actor_options"]["num_cpus"] = 0  # fits beside them
        return config

    def deploy(self, mnist_replicas: int) -> dict:
        ray_cluster.deploy(self.config(mnist_replicas), self.folder / "serve-config.yaml", self.head.dashboard_url, self.token)
        return ray_cluster.wait_running(self.head.dashboard_url, self.token, [ray_cluster.FRONT_APP, *MODELS], 300,
                                        want_replicas={"mnist": mnist_replicas})

    def pids(self) -> list[int]:
        for node in self.nodes:
            node.remember_children()
        return [pid for node in self.nodes for pid in (node.process.pid, *node.children)]

    def stop(self) -> None:
        pids = self.pids()
        for node in reversed(self.nodes):
            node.stop()
        alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"Ray processes left running: {alive}"
        if self.nodes:  # HAProxy included: Ray restarts it on config changes, an old one may be reparented
            assert not ray_cluster.processes_naming(self.head.temp_dir), "processes of the cluster left running"


@pytest.fixture(scope="module")
def cluster(archives, torchserve_answers, tmp_path_factory):
    _, precision_cache = torchserve_answers
    under_test = Cluster(tmp_path_factory.mktemp("ray"), precision_cache, archives)
    try:
        under_test.start()
        under_test.apps = under_test.deploy(mnist_replicas=2)
        yield under_test
    finally:
        under_test.stop()


@pytest.mark.ray
def test_scripts_serve_engine_ray_serves_the_store_and_stops_by_its_pids(archives, tmp_path):
    """What ``scripts/serve --engine ray`` runs (RayServer), over a store of mnist alone."""
    from graviton_serve.paths import CONFIG_FILE
    from graviton_serve.torchserve_config import read_properties, write_properties

    store = tmp_path / "store"
    store.mkdir()
    (store / "mnist.mar").symlink_to(next(archive for archive in archives if archive.stem == "mnist"))
    properties = read_properties(CONFIG_FILE)
    properties["inference_address"] = f"http://127.0.0.1:{free_loopback_ports(1)[0]}"
    write_properties(tmp_path / "config.properties", properties)
    server = RayServer(tmp_path / "run", store, tmp_path / "config.properties")
    lines: list[str] = []
    server.start(lines.append, timeout_s=300)
    try:
        assert server.is_running()
        state = json.loads(server.state_file.read_text())
        pids = [state["pid"], *(pid for pid, _ in state["children"])]
        reply = requests.post(server.url("inference", "predictions/mnist"), data=DIGIT, headers=server.auth(), timeout=60)
        assert reply.status_code == 200 and max(reply.json(), key=reply.json().get) == "7"
        assert [process.pid for process in server.replica_processes("mnist")]
        assert (server.run_folder.ray / "key_file.json").stat().st_mode & 0o077 == 0
        # HAProxy's admin socket (mode 666) is in a folder only we may enter
        assert (Path(state["temp_dir"]) / "p").stat().st_mode & 0o077 == 0
        assert list((Path(state["temp_dir"]) / "p").glob("*/admin.sock"))
    finally:
        server.stop()
    assert not ray_cluster.processes_naming(state["temp_dir"]), "processes of the cluster left running"
    assert not server.is_running()
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"Ray processes left running: {alive}"
    assert any("deployed" in line for line in lines)

@pytest.mark.ray
def test_mnist_replicas_are_spread_over_both_nodes(cluster):
    replicas = ray_cluster.replicas(cluster.apps["mnist"])
    assert len({replica["node_id"] for replica in replicas}) == 2, replicas


@pytest.mark.ray
@pytest.mark.parametrize("label", [label for label, *_ in SAME_REQUESTS])
def test_ray_serve_answers_what_torchserve_answers(cluster, torchserve_answers, label):
    answers, _ = torchserve_answers
    _, model, body, headers = next(request for request in SAME_REQUESTS if request[0] == label)
    reply = ask(cluster.base, cluster.key, model, body, headers)
    assert reply.headers["content-type"] == "application/json"
    assert (reply.status_code, reply.json()) == answers[label]


@pytest.mark.ray
@pytest.mark.parametrize("label", [label for label, *_ in SAME_EDGE_REQUESTS])
def test_the_token_the_body_limit_ping_and_unknown_models_answer_as_on_torchserve(cluster, torchserve_answers, label):
    answers, _ = torchserve_answers
    request = next(request for request in SAME_EDGE_REQUESTS if request[0] == label)
    assert ask_edge(cluster.base, cluster.key, *request[1:]) == answers[label]


@pytest.mark.ray
def test_a_bad_request_in_a_batch_gets_its_own_error_and_the_rest_are_answered(cluster):
    bodies = [DIGIT if index % 2 else b"not an image" for index in range(16)]
    replies: list[requests.Response | None] = [None] * len(bodies)

    def send(index: int) -> None:
        replies[index] = ask(cluster.base, cluster.key, "mnist", bodies[index], {})

    threads = [threading.Thread(target=send, args=(index,)) for index in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for body, reply in zip(bodies, replies):
        if body == DIGIT:
            assert reply.status_code == 200 and max(reply.json(), key=reply.json().get) == "7"
        else:
            assert reply.status_code == 400 and reply.json()["type"] == "BadInput"


@pytest.mark.ray
def test_the_token_the_body_limit_and_unknown_models_answer_as_torchserve_does(cluster):
    missing = requests.post(f"{cluster.base}/predictions/mnist", data=DIGIT, timeout=30)
    wrong = ask(cluster.base, "not-the-key", "mnist", DIGIT, {})
    for reply in (missing, wrong):
        assert reply.status_code == 400 and reply.json()["type"] == "InvalidKeyException"
    unknown = ask(cluster.base, cluster.key, "resnet50", DIGIT, {})
    assert unknown.status_code == 404 and unknown.json() == {
        "code": 404, "type": "ModelNotFoundException", "message": "Model not found: resnet50"}
    too_large = ask(cluster.base, cluster.key, "mnist", b"\0" * (MAX_REQUEST_BYTES + 1), {})
    assert too_large.status_code == 413 and too_large.json()["type"] == "PayloadTooLarge"
    assert requests.get(f"{cluster.base}/ping", headers={"Authorization": f"Bearer {cluster.key}"},
                        timeout=30).json() == {"status": "Healthy"}


@pytest.mark.ray
def test_replicas_scale_down_and_up_through_serves_config(cluster):
    down = cluster.deploy(mnist_replicas=1)
    assert len(ray_cluster.replicas(down["mnist"])) == 1
    assert ask(cluster.base, cluster.key, "mnist", DIGIT, {}).status_code == 200
    up = cluster.deploy(mnist_replicas=2)
    assert len({replica["node_id"] for replica in ray_cluster.replicas(up["mnist"])}) == 2


@pytest.mark.ray
def test_a_file_posted_as_a_form_is_a_400_that_says_so(cluster):
    """(TorchServe answers this one with its own 500: the README's input contract.)"""
    reply = ask(cluster.base, cluster.key, "mnist", DIGIT, {"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status_code == 400 and reply.json()["type"] == "BadInput" and "form" in reply.json()["message"]

@pytest.mark.ray
def test_requests_are_answered_while_a_node_dies(cluster):
    """Four clients send mnist requests while the worker node is killed (SIGKILL to every process
    of it, as a lost machine); a client retries a failed request up to 5 times, as a client of
    any replicated service must. Every request is answered: none lost."""
    expected = ask(cluster.base, cluster.key, "mnist", DIGIT, {}).json()
    outcome: Counter = Counter()
    stop_at = [time.monotonic() + 3600]
    lock = threading.Lock()

    def client() -> None:
        while time.monotonic() < stop_at[0]:
            for attempt in range(6):
                try:
                    reply = ask(cluster.base, cluster.key, "mnist", DIGIT, {}, timeout=60)
                    if reply.status_code == 200:
                        assert reply.json() == expected
                        with lock:
                            outcome["answered first time" if attempt == 0 else "answered after a retry"] += 1
                        break
                    failure = f"status {reply.status_code}"
                except requests.RequestException as error:
                    failure = type(error).__name__
                with lock:
                    outcome[f"failed once: {failure}"] += 1
                time.sleep(0.2)
            else:
                with lock:
                    outcome["lost"] += 1

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    time.sleep(3)
    cluster.worker.kill()
    killed_at = time.monotonic()
    stop_at[0] = killed_at + 15
    for thread in clients:
        thread.join()
    print(f"node failure under load: {dict(outcome)}")
    assert outcome["lost"] == 0
    assert outcome["answered first time"] + outcome["answered after a retry"] > 20
    deadline = time.monotonic() + 90  # Ray marks a node dead once its health checks fail
    while len(ray_cluster.alive_nodes(cluster.head.dashboard_url, cluster.token)) != 1:
        assert time.monotonic() < deadline, "Ray still counts the killed node as alive"
        time.sleep(1)
