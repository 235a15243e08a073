"""ResNet50 and DenseNet161 from the demo store on a real TorchServe, over REST and gRPC,
including AWS's DLC acceptance check: curl -T flower.jpg returns a JSON dict of exactly 5 entries."""

from __future__ import annotations

import json
import subprocess

import pytest
import requests

from graviton_serve.demo_store import build_demo_store
from graviton_serve.grpc_client import GrpcClient
from graviton_serve.paths import MODEL_STORE
from graviton_serve.sample_data import photo
from tests.conftest import ServerUnderTest
from tests.images import bomb_png

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory):
    archives = build_demo_store(MODEL_STORE, ["resnet50", "densenet161"])
    under_test = ServerUnderTest(tmp_path_factory.mktemp("ts_vision"), archives)
    server = under_test.start()
    yield server
    under_test.stop()


@pytest.mark.parametrize("model", ["densenet161", "resnet50"])
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
