"""The handler core through TorchServe's own Python Service (no Java): batch isolation, the
length invariant, the error table, settings validation and gRPC stream marking."""

from __future__ import annotations

import pytest
import torch

from handlers.errors import BadInput, PayloadTooLarge, UnsupportedMediaType, error_body, status_for
from handlers.settings import Setting, positive_int, read_settings
from tests.conftest import TESTS
from tests.inprocess import load_model_dir, load_service, predict, request


@pytest.fixture
def probe(tmp_path):
    """The probe handler and the core, laid out like an unpacked .mar."""
    load_model_dir(tmp_path, TESTS / "probe_handler.py", "probe", {"batchSize": 8, "handler": {"scale": 3}})
    return load_service(tmp_path, "probe_handler.py", name="probe")


def worker_of(service):
    return service._entry_point.worker


def test_good_items_are_answered_beside_bad_ones_in_one_batch(probe):
    replies = predict(probe, [
        request(b"1"), request(b"not a number"), request(b"big"), request(b"crash"),
        request(b"2"), request(b"13"),
    ])
    assert len(replies) == 6
    assert [r.status for r in replies] == [200, 400, 413, 500, 200, 500]
    assert replies[0].json() == {"value": 3.0}
    assert replies[4].json() == {"value": 6.0}
    assert replies[1].json() == {"code": 400, "type": "BadInput", "message": "send an integer"}
    assert replies[2].json()["type"] == "PayloadTooLarge"
    # A bug says so without leaking its exception text to the client.
    assert replies[3].json()["type"] == "InternalError"
    assert "KeyError" not in replies[3].body.decode()
    assert all(r.content_type == "application/json" for r in replies)
    # The three decodable items went through one forward.
    assert worker_of(probe).handler.forward_batch_sizes == [3]


def test_out_of_memory_is_isolated_to_the_item_that_causes_it(probe):
    replies = predict(probe, [request(b"5"), request(b"999"), request(b"7")])
    assert [r.status for r in replies] == [200, 507, 200]
    assert replies[1].json()["type"] == "OutOfMemory"
    assert [r.json()["value"] for r in (replies[0], replies[2])] == [15.0, 21.0]
    # The batch first, then each item alone.
    assert worker_of(probe).handler.forward_batch_sizes == [3, 1, 1, 1]


def test_a_batch_of_only_bad_items_never_calls_the_model(probe):
    replies = predict(probe, [request(b"x"), request(b"")])
    assert [r.status for r in replies] == [400, 400]
    assert worker_of(probe).handler.forward_batch_sizes == []


def test_settings_come_from_model_config(probe):
    assert worker_of(probe).settings == {"precision": "auto", "cores": 0, "compile": "off", "compile_timeout_s": 90, "scale": 3}


def test_grpc_requests_are_marked_complete_and_http_requests_are_not(probe):
    over_grpc, over_http = predict(probe, [request(b"1"), request(b"1", headers={"host": "127.0.0.1:8080"})])
    assert over_grpc.headers.get("ts_stream_next") == "false"
    assert "ts_stream_next" not in over_http.headers


def test_describe_returns_metadata(probe, tmp_path):
    entry = request(b"", headers={"describe": "True"})
    (reply,) = predict(probe, [entry])
    assert reply.status == 200
    assert reply.json()["model"] == "probe"


@pytest.mark.parametrize(
    "error, status, kind",
    [
        (BadInput("x"), 400, "BadInput"),
        (PayloadTooLarge("x"), 413, "PayloadTooLarge"),
        (UnsupportedMediaType("x"), 415, "UnsupportedMediaType"),
        (torch.OutOfMemoryError("x"), 507, "OutOfMemory"),
        (MemoryError(), 507, "OutOfMemory"),
        (ValueError("x"), 500, "InternalError"),
    ],
)
def test_error_table(error, status, kind):
    assert status_for(error) == (status, kind)
    body = error_body(error)
    assert (body["code"], body["type"]) == (status, kind)
    assert body["message"]


def test_unknown_setting_is_named():
    accepted = {"top_k": Setting(5, positive_int(10))}
    with pytest.raises(ValueError, match=r"handler\.topk"):
        read_settings({"handler": {"topk": 3}}, accepted)
    with pytest.raises(ValueError, match=r"handler\.top_k.*1 to 10"):
        read_settings({"handler": {"top_k": 0}}, accepted)
    assert read_settings({}, accepted) == {"top_k": 5}


def test_a_family_that_forgets_a_method_fails_at_load_naming_it():
    from handlers.model_handler import ModelHandler

    class NoEncode(ModelHandler):
        def load(self, model_dir, serialized_file, settings, device):
            return torch.nn.Identity()

        def decode(self, payload):
            return payload.body

    with pytest.raises(TypeError, match="encode"):
        NoEncode()
