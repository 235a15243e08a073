"""KServe request bodies through a real TorchServe running the kserve (v1) and kservev2 (v2)
service envelopes, as KServe's TorchServe runtime does: every instance answered in its place,
a bad one with its error body, the worker up."""

from __future__ import annotations

import base64
import json
import re

import pytest
import requests

from graviton_serve.deploy_checks import DEPLOY_DIR
from graviton_serve.kserve_wrapper import SettingsError, protocol_from_environment, torchserve_addresses
from graviton_serve.paths import CONFIG_FILE
from graviton_serve.server import TorchServe
from graviton_serve.torchserve_config import ConfigError, Ports
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


KSERVE_CONFIG = DEPLOY_DIR / "kserve" / "config" / "config.properties"


@pytest.mark.parametrize("environ, protocol", [
    ({"TS_SERVICE_ENVELOPE": "kserve"}, "v1"),
    ({"TS_SERVICE_ENVELOPE": "kservev2"}, "v2"),
    ({"TS_SERVICE_ENVELOPE": "kservev2", "PROTOCOL_VERSION": "grpc-v2"}, "grpc-v2"),
])
def test_the_wrappers_protocol_follows_kserves_variables(environ, protocol):
    assert protocol_from_environment(environ) == protocol


@pytest.mark.parametrize("environ, named", [
    ({}, "TS_SERVICE_ENVELOPE"),
    ({"TS_SERVICE_ENVELOPE": "kserve", "PROTOCOL_VERSION": "v3"}, "PROTOCOL_VERSION='v3'"),
    ({"TS_SERVICE_ENVELOPE": "kserve", "PROTOCOL_VERSION": "v2"}, "does not match TS_SERVICE_ENVELOPE=kserve"),
])
def test_a_protocol_setting_the_wrapper_cannot_serve_is_named(environ, named):
    with pytest.raises(SettingsError, match=re.escape(named)):
        protocol_from_environment(environ)


def test_the_shipped_kserve_config_keeps_torchserve_off_the_model_servers_ports(tmp_path):
    predictor, management, models = torchserve_addresses(KSERVE_CONFIG)
    assert predictor == "127.0.0.1:8085" and management == "http://127.0.0.1:8086" and "bert_sentiment" in models
    # The clash this config had: TorchServe's management API on 8081, where KServe's gRPC server binds.
    clashing = tmp_path / "config.properties"
    clashing.write_text(KSERVE_CONFIG.read_text().replace("127.0.0.1:8086", "127.0.0.1:8081"))
    with pytest.raises(ConfigError, match="management_address uses port 8081, which KServe's ModelServer listens on"):
        torchserve_addresses(clashing)
    token_on = tmp_path / "token.properties"
    token_on.write_text(KSERVE_CONFIG.read_text().replace("disable_token_authorization=true",
                                                          "disable_token_authorization=false"))
    with pytest.raises(ConfigError, match="disable_token_authorization must be true"):
        torchserve_addresses(token_on)


@pytest.mark.parametrize("environ, named", [
    ({}, "TS_SERVICE_ENVELOPE"),
    ({"TS_SERVICE_ENVELOPE": "kserve", "GS_KSERVE_PYTHON": "/nonexistent/python"}, "GS_KSERVE_PYTHON=/nonexistent"),
])
def test_the_kserve_runtime_names_a_bad_setting_before_anything_starts(tmp_path, monkeypatch, capsys, mnist_mar,
                                                                       environ, named):
    from graviton_serve import kserve_runtime

    (tmp_path / "store").mkdir()
    (tmp_path / "store" / mnist_mar.name).symlink_to(mnist_mar)
    for variable in ("TS_SERVICE_ENVELOPE", "PROTOCOL_VERSION", "GS_KSERVE_PYTHON"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in {"GS_MODEL_STORE": str(tmp_path / "store"), "GS_CONFIG": str(KSERVE_CONFIG),
                            "GS_RUN_DIR": str(tmp_path / "run"), **environ}.items():
        monkeypatch.setenv(variable, value)
    assert kserve_runtime.main() == 2
    assert named in capsys.readouterr().err


def test_each_element_of_a_v2_bytes_tensor_is_one_row_and_its_answers_join_back_in_order():
    from graviton_serve.kserve_wrapper import v2_outputs, v2_rows

    inputs = [{"name": "pair", "shape": [2], "datatype": "BYTES", "data": ["good", "bad"]},
              {"name": "pixels", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 0.25]}]
    rows, counts = v2_rows(inputs)
    assert counts == [2, 1]
    assert [row["data"] for row in rows] == [["good"], ["bad"], [0.5, 0.25]]
    assert [row["shape"] for row in rows] == [[1], [1], [1, 2]]
    answers = [{"name": "pair", "data": [{"label": "positive"}]}, {"name": "pair", "data": [{"label": "negative"}]},
               {"name": "pixels", "data": [{"code": 400, "type": "BadInput"}]}]
    pair, pixels = v2_outputs(answers, inputs, counts)
    assert pair == {"name": "pair", "datatype": "BYTES", "shape": [2],
                    "data": ['{"label": "positive"}', '{"label": "negative"}']}
    assert pixels["shape"] == [1] and json.loads(pixels["data"][0])["code"] == 400
