"""KServe request bodies through a real TorchServe running the kserve (v1) and kservev2 (v2)
service envelopes, as KServe's TorchServe runtime does: every instance answered in its place,
a bad one with its error body, the worker up."""

from __future__ import annotations

import base64
import json

import pytest
import requests

from graviton_serve.paths import CONFIG_FILE
from graviton_serve.server import TorchServe
from graviton_serve.torchserve_config import Ports
from tests.conftest import TESTS

pytestmark = pytest.mark.integration

DIGIT = base64.b64encode((TESTS / "data" / "digit.png").read_bytes()).decode()


def enveloped_server(tmp_path_factory, mnist_mar, envelope: str) -> TorchServe:
    root = tmp_path_factory.mktemp(f"ts_{envelope}")
    (root / "store").mkdir()
    (root / "store" / mnist_mar.name).write_bytes(mnist_mar.read_bytes())
    server = TorchServe(root / "run", root / "store", CONFIG_FILE, ports=Ports.free(),
                        overrides={"service_envelope": envelope})
    server.start(timeout=180)
    return server


@pytest.fixture(scope="module")
def v1_server(tmp_path_factory, mnist_mar):
    server = enveloped_server(tmp_path_factory, mnist_mar, "kserve")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def v2_server(tmp_path_factory, mnist_mar):
    server = enveloped_server(tmp_path_factory, mnist_mar, "kservev2")
    yield server
    server.stop()


def post_json(server, path: str, body: dict) -> requests.Response:
    return requests.post(server.url("inference", path), data=json.dumps(body),
                         headers={**server.auth(), "Content-Type": "application/json"}, timeout=60)


@pytest.mark.parametrize("path", ["predictions/mnist", "v1/models/mnist:predict"])
def test_v1_instances_each_answered_in_place(v1_server, path):
    reply = post_json(v1_server, path, {"instances": [{"data": DIGIT}, {"data": "not an image"}, DIGIT]})
    assert reply.status_code == 200
    first, bad, third = reply.json()["predictions"]
    assert next(iter(first)) == "7" and next(iter(third)) == "7"
    assert bad["code"] == 400 and bad["type"] == "BadInput"
    again = post_json(v1_server, path, {"instances": [{"data": DIGIT}]})
    assert next(iter(again.json()["predictions"][0])) == "7"  # the worker stayed up


@pytest.mark.parametrize("path", ["predictions/mnist", "v2/models/mnist/infer"])
def test_v2_inputs_each_answered_in_place(v2_server, path):
    body = {"id": "request-1", "inputs": [
        {"name": "digit", "shape": [1], "datatype": "BYTES", "data": [DIGIT]},
        {"name": "junk", "shape": [1], "datatype": "BYTES", "data": ["not an image"]},
    ]}
    reply = post_json(v2_server, path, body)
    assert reply.status_code == 200
    answer = reply.json()
    assert answer["id"] == "request-1" and answer["model_name"] == "mnist"
    digit, junk = answer["outputs"]
    assert digit["name"] == "digit" and next(iter(digit["data"][0])) == "7"
    assert junk["name"] == "junk" and junk["data"][0]["code"] == 400
