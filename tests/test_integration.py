"""A real TorchServe (Java frontend + Python workers) on free loopback ports, over REST and gRPC."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from graviton_serve.demos.mnist import split_digits
from graviton_serve.grpc_client import GrpcClient, main as grpc_client_main
from graviton_serve.run_folder import MODEL_LOG
from handlers.cpu_features import CpuFeatures
from tests.conftest import TESTS, ServerUnderTest, mnist_variant
from tests.images import bomb_png, png, truncated_png

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def grpc_client(mnist_server):
    with GrpcClient.from_key_file(
        mnist_server.run_folder.key_file,
        inference_port=mnist_server.ports.grpc_inference,
        management_port=mnist_server.ports.grpc_management,
    ) as client:
        yield client


def post(server, model: str, data: bytes, **kwargs) -> requests.Response:
    return requests.post(
        server.url("inference", f"predictions/{model}"), data=data, headers=server.auth(), timeout=60, **kwargs
    )


def worker_pids(server, model: str) -> list[int]:
    return [worker["pid"] for worker in server.management(timeout=10).model(model)["workers"]]


def test_held_out_accuracy_through_the_server(mnist_server):
    split = split_digits()
    bodies = [png(image) for image in split.held_out_images]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda body: post(mnist_server, "mnist", body), bodies))
    assert all(reply.status_code == 200 for reply in replies)
    predicted = [next(iter(reply.json())) for reply in replies]
    accuracy = sum(p == str(label) for p, label in zip(predicted, split.held_out_labels)) / len(bodies)
    print(f"MNIST held-out accuracy through TorchServe: {accuracy:.4f} on {len(bodies)} digits")
    assert accuracy >= 0.97


def test_rest_and_grpc_agree(mnist_server, grpc_client):
    digit = (Path(__file__).parent / "data" / "digit.png").read_bytes()
    over_rest = post(mnist_server, "mnist", digit)
    assert over_rest.status_code == 200
    assert over_rest.headers["content-type"] == "application/json"
    over_grpc = json.loads(grpc_client.predict("mnist", {"data": digit}))
    streamed = [json.loads(chunk) for chunk in grpc_client.stream_predict("mnist", {"data": digit, "top_k": b"2"})]
    assert over_rest.json() == over_grpc
    assert next(iter(over_grpc)) == "7" and len(over_grpc) == 5
    assert streamed == [dict(list(over_grpc.items())[:2])]


@pytest.mark.cpu_sensitive  # auto's candidates depend on the CPU: run again as other CPUs by scripts/test
def test_grpc_ping_list_describe(grpc_client):
    assert json.loads(grpc_client.ping())["status"] == "Healthy"
    assert [m["modelName"] for m in grpc_client.list_models()["models"]] == ["mnist"]
    (described,) = grpc_client.describe_model("mnist", customized=True)
    assert described["customizedMetadata"]["held_out_accuracy"] >= 0.97
    int8 = described["customizedMetadata"]["int8"]  # int8's held-out guard, measured at build
    assert int8["examples"] == 1000 and abs(int8["fp32"] - int8["int8"]) <= 0.01
    serving = described["customizedMetadata"]["serving"]  # what auto chose, and why
    offered = {"fp32", "int8"} | ({"bf16"} if CpuFeatures.detect().bf16 else set())  # as the server's CPU (GS_CPU_AS)
    assert serving["precision"] in offered
    assert serving["precision_why"].startswith(("auto: fastest that passed its guards", "int8 refused", "accuracy guard"))


def test_grpc_bad_input_gets_the_error_body_and_the_stream_survives(mnist_server, grpc_client):
    pids = worker_pids(mnist_server, "mnist")
    body = json.loads(grpc_client.predict("mnist", {"data": b"not an image"}))
    assert body["code"] == 400 and body["type"] == "BadInput"
    (streamed,) = grpc_client.stream_predict("mnist", {"data": b"not an image"})
    assert json.loads(streamed)["code"] == 400
    assert worker_pids(mnist_server, "mnist") == pids


def test_token_is_required(mnist_server):
    digit = (Path(__file__).parent / "data" / "digit.png").read_bytes()
    anonymous = requests.post(mnist_server.url("inference", "predictions/mnist"), data=digit, timeout=30)
    wrong = requests.post(mnist_server.url("inference", "predictions/mnist"), data=digit, timeout=30,
                          headers={"Authorization": "Bearer wrong"})
    assert anonymous.status_code != 200 and wrong.status_code != 200
    assert "Token Authorization failed" in anonymous.text
    # The model API is off: registering is refused even with the management token.
    register = requests.post(mnist_server.url("management", "models"), params={"url": "mnist.mar"},
                             headers=mnist_server.auth("management"), timeout=30)
    assert register.status_code != 200


def test_prometheus_metrics(mnist_server):
    metrics = requests.get(mnist_server.url("metrics", "metrics"), timeout=30)
    assert metrics.status_code == 200
    assert "ts_inference_requests_total" in metrics.text


@pytest.fixture(scope="module")
def batching_server(mnist_dir, tmp_path_factory):
    """MNIST repackaged so that 8 concurrent requests surely share one batch."""
    root = tmp_path_factory.mktemp("ts_batch")
    archive = mnist_variant(mnist_dir, root / "built", "mnist_batch", {
        "minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 5000, "responseTimeout": 60})
    under_test = ServerUnderTest(root, [archive])
    server = under_test.start()
    yield server
    under_test.stop()


def batches_seen(server) -> int:
    return server.run_folder.log(MODEL_LOG).read_text().count("Backend received inference")


def test_bad_inputs_fail_alone_inside_one_batch_and_the_worker_stays(batching_server):
    split = split_digits()
    good = [png(split.held_out_images[i]) for i in range(3)]
    cases = [
        (good[0], {}, 200),
        (b"", {}, 400),
        (b"this is not an image", {"Content-Type": "application/octet-stream"}, 400),
        (truncated_png(), {}, 400),
        (good[1], {}, 200),
        (bomb_png(), {}, 413),
        (b"{broken json", {"Content-Type": "application/json"}, 400),
        (good[2], {}, 200),
    ]
    pids = worker_pids(batching_server, "mnist_batch")
    before = batches_seen(batching_server)

    def send(case):
        body, headers, _ = case
        return requests.post(batching_server.url("inference", "predictions/mnist_batch"), data=body, timeout=60,
                             headers={**batching_server.auth(), **headers})

    with ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(send, cases))
    assert [r.status_code for r in replies] == [expected for _, _, expected in cases]
    for reply, label in zip((replies[0], replies[4], replies[7]), split.held_out_labels[:3]):
        assert next(iter(reply.json())) == str(label)
    for reply in replies:
        if reply.status_code != 200:
            assert reply.json()["code"] == reply.status_code and reply.json()["message"]
    time.sleep(0.5)  # the worker's log line reaches the frontend's log asynchronously
    assert batches_seen(batching_server) - before == 1, "the 8 requests did not share one batch"
    assert worker_pids(batching_server, "mnist_batch") == pids


def stage_counters(server, model: str) -> dict[str, float]:
    """Our per-stage counters for ``model`` on the Prometheus endpoint (absent: 0)."""
    text = requests.get(server.url("metrics", "metrics"), timeout=30).text
    found = {}
    for name, labels, value in re.findall(r"^(graviton_serve_\w+)\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        if f'ModelName="{model}"' in labels:
            stage = re.search(r'Stage="(\w+)"', labels)
            found[name + (f"[{stage.group(1)}]" if stage else "")] = float(value)
    return found


def test_stage_times_and_batch_fill_are_prometheus_counters(batching_server):
    before = stage_counters(batching_server, "mnist_batch")
    digits = [png(image) for image in split_digits().held_out_images[:8]]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda body: post(batching_server, "mnist_batch", body), digits))
    assert [reply.status_code for reply in replies] == [200] * 8
    deadline = time.monotonic() + 15  # the worker's metric lines reach the frontend asynchronously
    while time.monotonic() < deadline:
        after = stage_counters(batching_server, "mnist_batch")
        if after.get("graviton_serve_batches_total", 0) > before.get("graviton_serve_batches_total", 0):
            break
        time.sleep(0.5)
    grew = {name: after[name] - before.get(name, 0.0) for name in after}
    assert grew["graviton_serve_batches_total"] == 1  # the 8 requests shared one batch (maxBatchDelay 5 s)
    assert grew["graviton_serve_batch_items_total"] == 8
    for stage in ("decode", "forward", "encode"):
        assert 0 < grew[f"graviton_serve_stage_seconds_total[{stage}]"] < 30


def test_stopping_leaves_no_process(mnist_mar, tmp_path):
    under_test = ServerUnderTest(tmp_path, [mnist_mar])
    server = under_test.start()
    assert len(under_test.pids) >= 2  # frontend + worker
    assert all(path.is_relative_to(tmp_path) for path in (server.run_folder.pid_file, server.run_folder.key_file, server.run_folder.logs))
    under_test.stop()  # asserts every PID is gone
    assert not server.run_folder.pid_file.exists()


def test_grpc_client_script_exits_non_zero_on_an_error_body(mnist_server, capsys):
    common = ["--inference-port", str(mnist_server.ports.grpc_inference), "--key-file", str(mnist_server.run_folder.key_file)]
    assert grpc_client_main([*common, "predict", "mnist", str(TESTS / "data" / "digit.png")]) == 0
    assert grpc_client_main([*common, "predict", "mnist", "--text", "not an image"]) == 1
    assert '"code": 400' in capsys.readouterr().out  # the error body is still printed
    with pytest.raises(SystemExit) as exited:  # a file that is not there: a usage error, not a traceback
        grpc_client_main([*common, "predict", "mnist", str(TESTS / "data" / "no-such-file.png")])
    assert exited.value.code == 2 and "cannot read" in capsys.readouterr().err


def described_serving(server, model: str) -> dict:
    reply = requests.get(server.url("management", f"models/{model}?customized=true"), headers=server.auth("management"),
                         timeout=60)
    metadata = reply.json()[0]["customizedMetadata"]
    return (json.loads(metadata) if isinstance(metadata, str) else metadata)["serving"]


def test_a_restart_serves_the_precision_auto_chose_at_the_first_start(mnist_mar, tmp_path):
    """auto times at the first start of an archive on this machine, keeps the outcome in the run
    folder, and every later start reads it back: the same precision, and the same answers."""
    under_test = ServerUnderTest(tmp_path, [mnist_mar])
    digit = (TESTS / "data" / "digit.png").read_bytes()
    served = []
    for _ in range(2):
        server = under_test.start()
        try:
            served.append((described_serving(server, "mnist"), post(server, "mnist", digit).json()))
        finally:
            under_test.stop()
    (first, first_answer), (again, again_answer) = served
    assert again["precision"] == first["precision"] and again_answer == first_answer
    if first["precision_why"].startswith("auto: fastest"):  # it timed (int8 passed its guards), then read it back
        assert "(timed at this start, cached in " in first["precision_why"] and "(cache " in again["precision_why"]
        assert first["precision_why"].split(" (timed at")[0] == again["precision_why"].split(" (cache")[0]
    print(f"mnist, two starts: {first['precision']} ({first['precision_why'][:160]}...), then {again['precision']} "
          f"({again['precision_why'][:160]}...)")
