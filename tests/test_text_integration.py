"""The four text demos on a real TorchServe, over REST and gRPC."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from graviton_serve.demo_store import build_demo_store
from graviton_serve.demos.corpus import LABELS, clear_sentences, majority_share, tweets
from graviton_serve.grpc_client import GrpcClient
from graviton_serve.paths import MODEL_STORE
from tests.conftest import ServerUnderTest

pytestmark = pytest.mark.integration

TEXT_MODELS = ["bert_sentiment", "roberta_sentiment", "bert_fill_mask", "roberta_fill_mask"]
ACCURACY_SAMPLE = 600  # held-out tweets sent through the server


@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    archives = build_demo_store(MODEL_STORE, TEXT_MODELS)
    under_test = ServerUnderTest(tmp_path_factory.mktemp("ts_text"), archives)
    server = under_test.start()
    yield server
    under_test.stop()


@pytest.fixture(scope="module")
def grpc(text_server):
    with GrpcClient.from_key_file(text_server.run_folder.key_file, inference_port=text_server.ports.grpc_inference,
                                  management_port=text_server.ports.grpc_management) as client:
        yield client


def post(server, model, body, content_type="text/plain; charset=utf-8"):
    return requests.post(server.url("inference", f"predictions/{model}"), data=body.encode() if isinstance(body, str) else body,
                         headers={**server.auth(), "Content-Type": content_type}, timeout=120)


@pytest.mark.parametrize("model, text", [
    ("bert_sentiment", "I love riding in self-driving cars, they are great!"),
    ("roberta_sentiment", "I love riding in self-driving cars, they are great!"),
    ("bert_fill_mask", "I would never ride in a self-driving [MASK]."),
    ("roberta_fill_mask", "I would never ride in a self-driving <mask>."),
])
def test_rest_and_grpc_agree(text_server, grpc, model, text):
    over_rest = post(text_server, model, text)
    assert over_rest.status_code == 200, over_rest.text
    over_grpc = json.loads(grpc.predict(model, {"data": text.encode()}))
    assert over_rest.json() == over_grpc
    if model.endswith("sentiment"):
        assert over_grpc["label"] in LABELS and list(over_grpc["scores"]) == list(LABELS)
    else:
        assert len(over_grpc) == 5 and all(set(a) == {"token", "token_str", "score", "sequence"} for a in over_grpc)


def test_the_other_mask_spelling_and_json_body(text_server):
    reply = post(text_server, "roberta_fill_mask", json.dumps({"inputs": "The car is [MASK].", "top_k": 3}), "application/json")
    assert reply.status_code == 200 and len(reply.json()) == 3
    missing = post(text_server, "bert_fill_mask", "no mask at all")
    assert missing.status_code == 400 and "[MASK]" in missing.json()["message"]


def test_describe_states_what_was_trained(grpc):
    for model in TEXT_MODELS:
        (described,) = grpc.describe_model(model, customized=True)
        metadata = described["customizedMetadata"]
        assert metadata["trained"] is True
        if model.endswith("sentiment"):
            assert metadata["points_over_majority"] >= 20 and metadata["clear_sentences_accuracy"] >= 0.75
        else:  # the build's own figures: beat always answering the most frequent tokens, and say the demo is weak
            assert metadata["held_out_masked_top5_accuracy"] >= metadata["held_out_masked_top5_most_frequent_tokens"] + 0.03
            assert "does not fill plain sentences" in metadata["limitations"]


def test_bert_sentiment_held_out_accuracy_through_the_server(text_server):
    _, held_out = tweets()
    sample = random.Random(7).sample(held_out, ACCURACY_SAMPLE)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda row: post(text_server, "bert_sentiment", row[0]), sample))
    assert all(r.status_code == 200 for r in replies)
    accuracy = sum(r.json()["label"] == LABELS[label] for r, (_, label) in zip(replies, sample)) / len(sample)
    majority = majority_share(sample)
    print(f"bert_sentiment through TorchServe: accuracy {accuracy:.4f} on {len(sample)} held-out tweets, majority {majority:.4f}")
    assert accuracy >= majority + 0.25


@pytest.mark.parametrize("model, target", [("bert_sentiment", 0.85), ("roberta_sentiment", 0.75)])
def test_clear_sentences_are_read_right_through_the_server(text_server, model, target):
    rows = clear_sentences()
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda row: post(text_server, model, row[0]), rows))
    assert all(r.status_code == 200 for r in replies)
    wrong = [(text, LABELS[label], r.json()["label"]) for r, (text, label) in zip(replies, rows) if r.json()["label"] != LABELS[label]]
    accuracy = 1 - len(wrong) / len(rows)
    print(f"{model} through TorchServe: {accuracy:.4f} on {len(rows)} clear sentences; wrong: {wrong}")
    assert accuracy >= target, wrong
