"""Inputs real clients send, through one real TorchServe (REST, and gRPC where the transport matters).

Each test names the case of the input-bug list it proves (case 1..8); tests named ``proposal_*``
are cases added from reading TorchServe's request decoding (``ts/protocol/otf_message_handler.py``
and ``ts/service.py``), with the status proposed for them.

What TorchServe 0.12 hands the handler (one dict per request, from the part name to its value; the
part's content type under the same name in ``context.get_all_request_header(i)``, beside the HTTP
headers as str values), observed with an echo handler on this TorchServe:

- a plain body arrives under ``"body"``: ``application/json`` exactly (no parameters) -> the parsed
  JSON value of ANY type (dict, list, str, int, bool, None); invalid JSON, a UTF-8 BOM before it, or
  JSON nested past Python's recursion limit -> bytearray. ``application/json; charset=utf-8`` ->
  bytearray (only the exact type is parsed). ``text/*`` -> str if valid UTF-8, else bytearray.
  Anything else (no type, octet-stream, image/*) -> bytearray.
- multipart/form-data: each part under its own name (``-F data=@review.txt`` -> ``{"data": str}``
  for a text/plain part; ``-F image=@x.png`` -> ``{"image": bytearray}``; a field without a type,
  e.g. ``-F top_k=3`` -> bytearray with content type "").
- **application/x-www-form-urlencoded** is parsed by the frontend (Netty) into fields: a body with
  no ``=``, e.g. ``This phone is great`` as ``curl -d @review.txt`` or urllib send it, becomes an
  EMPTY dict ``{}`` (the text is gone; only the request header ``Content-Type:
  application/x-www-form-urlencoded`` and ``Content-Length: 19`` tell what was sent); ``Good & cheap
  = great`` becomes ``{"Good": bytearray(b""), "cheap": bytearray(b" great")}``; a real form
  ``text=This%20phone+is%20great&top_k=3`` becomes ``{"text": bytearray(b"This phone is great"),
  "top_k": bytearray(b"3")}`` (each with content type ""); an empty form or ``100% great`` -> ``{}``.
- gRPC: each key of the input map is a part with content type "" -> bytearray; there are no HTTP
  headers, and TorchServe 0.12's Predictions does not carry the handler's status: an error comes
  back as a normal reply whose body is the error JSON.

One TorchServe serves the whole module: mnist, resnet50, densenet161 and roberta_fill_mask as the
demo store builds them, plus ``bert_sentiment_batch`` and ``resnet50_batch``: bert_sentiment and
resnet50 repackaged with batchSize 8 / maxBatchDelay 3000 ms (handler section unchanged) so that
concurrent requests surely share one batch (case 8). A single request to a batch variant waits
out the 3 s delay; that is the price of one server.

Memory guard: right after start every worker gets an address-space limit (RLIMIT_AS) of its size
then plus WORKER_HEADROOM_BYTES, so that a handler that tries to materialise a huge resized image
(the bug of case 6: 60000x1 resized for ResNet is 13.9 million x 232 pixels, ~13 GB) gets a
MemoryError (answered 507 by the handler core) instead of pushing a shared 2-core/23 GB machine
into the kernel's OOM killer. A correct handler stays far below it.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import grpc as grpc_module
import psutil
import pytest
import requests
from PIL import Image

from graviton_serve.demo_store import build_demo_store
from graviton_serve.grpc_client import GrpcClient
from graviton_serve.paths import MODEL_STORE
from graviton_serve.run_folder import MODEL_LOG
from tests.conftest import ServerUnderTest
from tests.realworld_inputs import (
    BROKEN_EXIF_KINDS,
    archive_variant,
    b64,
    broken_exif_jpeg,
    cesu8_surrogate_text,
    data_url,
    deeply_nested_json,
    exif_transpose_error,
    good_png,
    gzip_bomb,
    gzipped,
    lone_surrogate_json,
    lying_ico,
    many_scans_jpeg,
    progressive_jpeg,
    panorama_png,
    strip_png,
    truncated_png,
)

pytestmark = pytest.mark.integration

SENTIMENT = "bert_sentiment_batch"  # bert_sentiment, batchSize 8, maxBatchDelay 3000 ms
FILL_MASK = "roberta_fill_mask"
IMAGE_BATCH = "resnet50_batch"  # resnet50, batchSize 8, maxBatchDelay 3000 ms
# densenet161 is optional (its archive and worker add ~10-20 s to the start); GS_REALWORLD_DENSENET=0 drops it
SERVE_DENSENET = os.environ.get("GS_REALWORLD_DENSENET", "1") != "0"
IMAGE_MODELS = ["resnet50", "mnist"] + (["densenet161"] if SERVE_DENSENET else [])
BATCH_KEYS = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 3000, "responseTimeout": 120}
WORKER_HEADROOM_BYTES = 6 * 1024**3
ERROR_TYPES = {400: "BadInput", 413: "PayloadTooLarge", 415: "UnsupportedMediaType", 507: "OutOfMemory",
               500: "InternalError"}
SENTENCE = "This phone is great"
FILL_SENTENCE = "This phone is <mask>."


@dataclass
class Served:
    server: object  # graviton_serve.server.TorchServe
    pids: dict[str, list[int]]  # model -> its worker PIDs right after start
    start_s: float


def worker_pids(server, model: str) -> list[int]:
    response = requests.get(server.url("management", f"models/{model}"), headers=server.auth("management"), timeout=10)
    assert response.status_code == 200, response.text
    return sorted(worker["pid"] for worker in response.json()[0]["workers"])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    demo = ["mnist", "resnet50", "bert_sentiment", "roberta_fill_mask"] + (["densenet161"] if SERVE_DENSENET else [])
    by_name = {archive.stem: archive for archive in build_demo_store(MODEL_STORE, demo)}
    root = tmp_path_factory.mktemp("ts_realworld")
    variants = [
        archive_variant(by_name["bert_sentiment"], root / "built", SENTIMENT, BATCH_KEYS),
        archive_variant(by_name["resnet50"], root / "built", IMAGE_BATCH, BATCH_KEYS),
    ]
    archives = [by_name[name] for name in demo if name != "bert_sentiment"] + variants
    under_test = ServerUnderTest(root, archives)
    started = time.monotonic()
    server = under_test.start()
    start_s = time.monotonic() - started
    print(f"real-world-inputs TorchServe: every model READY {start_s:.1f}s after start")
    try:
        models = [archive.stem for archive in archives]
        pids = {model: worker_pids(server, model) for model in models}
        for model_pids in pids.values():
            for pid in model_pids:
                process = psutil.Process(pid)
                limit = process.memory_info().vms + WORKER_HEADROOM_BYTES
                # the soft limit only (the hard one could not be raised again without CAP_SYS_RESOURCE)
                process.rlimit(psutil.RLIMIT_AS, (limit, process.rlimit(psutil.RLIMIT_AS)[1]))
        yield Served(server, pids, start_s)
    finally:
        under_test.stop()


@pytest.fixture(scope="module")
def grpc(served):
    server = served.server
    with GrpcClient.from_key_file(server.run_folder.key_file, inference_port=server.ports.grpc_inference,
                                  management_port=server.ports.grpc_management, timeout=120) as client:
        yield client


# --- sending and checking ----------------------------------------------------------------------


def post(served: Served, model: str, data=None, content_type: str | None = None, headers_extra: dict | None = None,
         **kwargs) -> requests.Response:
    """One REST prediction. ``content_type`` None: what requests sets (none for bytes, the multipart
    type for files=, application/json for json=)."""
    headers = {**served.server.auth(), **({"Content-Type": content_type} if content_type is not None else {}),
               **(headers_extra or {})}
    return requests.post(served.server.url("inference", f"predictions/{model}"), data=data, headers=headers,
                         timeout=180, **kwargs)


def body_of(reply: requests.Response):
    try:
        return reply.json()
    except ValueError:
        pytest.fail(f"HTTP {reply.status_code} with a body that is not JSON: {reply.text[:300]!r}")


def assert_error(reply: requests.Response, status: int) -> str:
    """The reply is the contract's error for ``status``; returns its message."""
    body = body_of(reply)
    assert reply.status_code == status, f"expected {status}, got {reply.status_code}: {body}"
    check_error_body(body, status)
    return body["message"]


def check_error_body(body, status: int) -> None:
    assert isinstance(body, dict) and set(body) == {"code", "type", "message"}, body
    assert body["code"] == status and body["type"] == ERROR_TYPES.get(status), body
    assert isinstance(body["message"], str) and body["message"].strip(), body


def check_sentiment(body) -> None:
    assert isinstance(body, dict), body
    assert set(body) in ({"label", "score", "scores"}, {"label", "score", "scores", "truncated"}), body
    assert body.get("truncated", True) is True, body
    scores = body["scores"]
    assert isinstance(scores, dict) and len(scores) >= 2 and body["label"] in scores, body
    assert all(isinstance(p, float) and 0.0 <= p <= 1.0 for p in scores.values()), body
    assert body["score"] == scores[body["label"]] == max(scores.values()), body
    assert math.isclose(sum(scores.values()), 1.0, abs_tol=1e-3), body


def check_fill_mask(body, top_k: int = 5) -> None:
    assert isinstance(body, list) and len(body) == top_k, body
    for answer in body:
        assert isinstance(answer, dict) and set(answer) == {"token", "token_str", "score", "sequence"}, answer
        assert isinstance(answer["token"], int) and isinstance(answer["token_str"], str), answer
        assert isinstance(answer["sequence"], str) and 0.0 <= answer["score"] <= 1.0, answer
    assert [a["score"] for a in body] == sorted((a["score"] for a in body), reverse=True), body


def check_top5(body, top_k: int = 5) -> None:
    assert isinstance(body, dict) and len(body) == top_k, body
    assert all(isinstance(label, str) for label in body), body
    assert all(isinstance(p, float) and 0.0 <= p <= 1.0 for p in body.values()), body
    assert list(body.values()) == sorted(body.values(), reverse=True), body


def assert_ok(reply: requests.Response, check) -> None:
    body = body_of(reply)
    assert reply.status_code == 200, f"expected 200, got {reply.status_code}: {body}"
    check(body)


def assert_same_workers(served: Served, *models: str) -> None:
    for model in models:
        assert worker_pids(served.server, model) == served.pids[model], f"{model}'s worker was replaced"


def text_check(model: str):
    return check_sentiment if model == SENTIMENT else check_fill_mask


def text_for(model: str) -> str:
    return SENTENCE if model == SENTIMENT else FILL_SENTENCE


# --- case 1: broken image metadata -----------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BROKEN_EXIF_KINDS))
def test_case1_precondition_the_file_breaks_exif_transpose_on_this_pillow(kind):
    """The file really is the bug: Pillow opens and decodes it, and only exif_transpose raises."""
    error = exif_transpose_error(broken_exif_jpeg(kind))
    assert error is not None, "exif_transpose no longer raises on this file: the case tests nothing"
    print(f"{kind}: exif_transpose raises {error}")


@pytest.mark.parametrize("kind", sorted(BROKEN_EXIF_KINDS))
@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_case1_broken_exif_jpeg_is_served(served, model, kind):
    assert_ok(post(served, model, broken_exif_jpeg(kind), "image/jpeg"), check_top5)


# --- case 2: a lone UTF-16 surrogate --------------------------------------------------------------


def test_case2_lone_surrogate_in_json_text(served):
    assert_ok(post(served, SENTIMENT, lone_surrogate_json(), "application/json"), check_sentiment)


def test_case2_lone_surrogate_in_fill_mask_json(served):
    body = lone_surrogate_json("This phone is <mask>. Loved it \ud83d")
    assert_ok(post(served, FILL_MASK, body, "application/json"), check_fill_mask)


# --- case 3: JSON bodies of every type ------------------------------------------------------------


@pytest.mark.parametrize("model", [SENTIMENT, FILL_MASK])
def test_case3_json_string_body(served, model):
    # what requests.post(url, json="This phone is great") sends
    assert_ok(post(served, model, json=text_for(model)), text_check(model))


@pytest.mark.parametrize("model", [SENTIMENT, FILL_MASK])
def test_case3_json_list_is_one_text_per_request(served, model):
    message = assert_error(post(served, model, json=["a", "b"]), 400)
    assert "one text per request" in message
    assert "not valid JSON" not in message


@pytest.mark.parametrize("raw", [b"null", b"42", b"true"])
def test_case3_json_scalars_are_bad_input(served, raw):
    assert_error(post(served, SENTIMENT, raw, "application/json"), 400)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/json;charset=UTF-8"])
@pytest.mark.parametrize("model", [SENTIMENT, FILL_MASK])
def test_case3_json_with_charset(served, model, content_type):
    body = json.dumps({"text": text_for(model)}).encode()
    assert_ok(post(served, model, body, content_type), text_check(model))


# --- case 4: multipart text parts -----------------------------------------------------------------


@pytest.mark.parametrize("model", [SENTIMENT, FILL_MASK])
def test_case4_multipart_data_text_part(served, model):
    # curl -F data=@review.txt
    reply = post(served, model, files={"data": ("review.txt", (text_for(model) + "\n").encode(), "text/plain")})
    assert_ok(reply, text_check(model))


@pytest.mark.parametrize("model", [SENTIMENT, FILL_MASK])
def test_case4_blank_multipart_data_part_is_400(served, model):
    assert_error(post(served, model, files={"data": ("review.txt", b"  \n\t \n", "text/plain")}), 400)


# --- issue 27 kind 6: text made only of invisible characters -------------------------------------

# Zero-width space/non-joiner/joiner, word joiner, BOMs, direction marks and overrides, a soft
# hyphen, a variation selector alone, the Hangul filler and a braille blank: nothing a reader sees.
INVISIBLE_TEXTS = {
    "zero-width": "\u200b\u200c\u200d\u2060",
    "BOMs": "\ufeff\ufeff",
    "direction marks": "\u200e\u200f\u202e\u2066\u2069",
    "mixed with spaces": " \u200b \u00ad\ufe0f\u3164\u2800\n\u200f ",
}


@pytest.mark.parametrize("kind", sorted(INVISIBLE_TEXTS))
@pytest.mark.parametrize("model", [SENTIMENT, FILL_MASK])
def test_text_of_invisible_characters_is_empty_text(served, model, kind):
    text = INVISIBLE_TEXTS[kind]
    for reply in (post(served, model, text.encode(), "text/plain; charset=utf-8"), post(served, model, json={"text": text})):
        assert "no visible characters" in assert_error(reply, 400)
    assert_same_workers(served, model)


def test_text_of_invisible_characters_is_empty_over_grpc(served, grpc):
    answer = json.loads(grpc.predict(SENTIMENT, {"data": INVISIBLE_TEXTS["zero-width"].encode()}))
    check_error_body(answer, 400)
    assert "no visible characters" in answer["message"]


def test_invisible_characters_around_a_sentence_are_served(served):
    # a BOM and zero-width joiners in real text (emoji sequences, pasted text) are not refused
    assert_ok(post(served, SENTIMENT, ("\ufeff" + SENTENCE + " \U0001f469\u200d\U0001f4bb").encode(), "text/plain"),
              check_sentiment)


# --- case 5: a raw body sent as a form ------------------------------------------------------------


@pytest.mark.parametrize("model", [SENTIMENT, FILL_MASK])
def test_case5_raw_text_sent_as_form(served, model):
    # curl -d @review.txt / urllib: the body as-is, typed as a form; TorchServe drops it (see above)
    message = assert_error(post(served, model, text_for(model).encode(), "application/x-www-form-urlencoded"), 400)
    assert "x-www-form-urlencoded" in message
    assert "--data-binary" in message and "text/plain" in message, message
    assert "the request body is empty" not in message


# --- case 6: tiny file, extreme aspect ratio -------------------------------------------------------


def image_requests(data: bytes) -> dict[str, dict]:
    """The ways a client sends one image over REST: post() keyword arguments."""
    return {
        "raw": {"data": data, "content_type": "image/png"},
        "base64_json": {"json": {"image": b64(data)}},
        "data_url_json": {"json": {"image": data_url(data)}},
        "multipart_image": {"files": {"image": ("x.png", data, "image/png")}},
    }


def assert_too_many_pixels(body, status: int) -> None:
    check_error_body(body, 413)
    assert status == 413, body
    assert "max_image_pixels" in body["message"], body


@pytest.mark.parametrize("width", [8000, 60000])
@pytest.mark.parametrize("way", list(image_requests(b"")))
def test_case6_extreme_aspect_ratio_over_rest(served, way, width):
    data = strip_png(width)
    assert len(data) < 200
    reply = post(served, "resnet50", **image_requests(data)[way])
    assert_too_many_pixels(body_of(reply), reply.status_code)
    assert_same_workers(served, "resnet50")


@pytest.mark.parametrize("width", [8000, 60000])
def test_case6_extreme_aspect_ratio_over_grpc(served, grpc, width):
    answer = json.loads(grpc.predict("resnet50", {"data": strip_png(width)}))
    assert_too_many_pixels(answer, answer.get("code") if isinstance(answer, dict) else None)
    (streamed,) = grpc.stream_predict("resnet50", {"data": strip_png(width)})
    streamed = json.loads(streamed)
    assert_too_many_pixels(streamed, streamed.get("code") if isinstance(streamed, dict) else None)
    assert_same_workers(served, "resnet50")


@pytest.mark.skipif(not SERVE_DENSENET, reason="densenet161 not served (start-up too slow)")
def test_case6_extreme_aspect_ratio_to_densenet(served):
    reply = post(served, "densenet161", strip_png(60000), "image/png")
    assert_too_many_pixels(body_of(reply), reply.status_code)
    assert_same_workers(served, "densenet161")


@pytest.mark.parametrize("model", [m for m in IMAGE_MODELS if m != "mnist"])
def test_case6_panorama_is_served(served, model):
    assert_ok(post(served, model, panorama_png(4000, 1000), "image/png"), check_top5)
    assert_same_workers(served, model)


# --- case 9: my proposals ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", [SENTIMENT, "resnet50"])
def test_proposal_deeply_nested_json_is_bad_input_not_internal_error(served, model):
    # TorchServe's json.loads hits RecursionError, forwards the bytes; parsing them again must be a 400
    assert_error(post(served, model, deeply_nested_json(), "application/json"), 400)


@pytest.mark.parametrize("raw", [b"null", b"42", b"true"])
def test_proposal_valid_json_scalars_are_not_called_invalid_json(served, raw):
    message = assert_error(post(served, FILL_MASK, raw, "application/json"), 400)
    assert "not valid JSON" not in message


@pytest.mark.parametrize("field", ["text", "data"])
def test_proposal_a_real_form_field_still_works(served, field):
    # curl --data-urlencode 'text=This phone is <mask>.' : a form field that carries the text
    reply = post(served, FILL_MASK, f"{field}={quote(FILL_SENTENCE)}&top_k=3".encode(),
                 "application/x-www-form-urlencoded")
    assert_ok(reply, lambda body: check_fill_mask(body, top_k=3))


def test_proposal_form_encoded_sentence_with_ampersand_is_not_served_as_garbage(served):
    # "Good & cheap = great" arrives as fields {"Good": b"", "cheap": b" great"}
    message = assert_error(post(served, FILL_MASK, b"Good & cheap = <mask>", "application/x-www-form-urlencoded"), 400)
    assert "x-www-form-urlencoded" in message


@pytest.mark.parametrize("body", [b"This is a photo", b64(good_png()).encode()], ids=["text", "base64_png"])
def test_proposal_image_sent_as_form_says_form_not_empty(served, body):
    # curl -d @photo.b64 : base64 as a form; TorchServe turns it into a field name or drops it
    message = assert_error(post(served, "resnet50", body, "application/x-www-form-urlencoded"), 400)
    assert "x-www-form-urlencoded" in message
    assert "the request body is empty" not in message


def test_proposal_json_with_utf8_bom(served):
    # PowerShell / Notepad write a BOM; TorchServe leaves such a body as bytes
    body = b"\xef\xbb\xbf" + json.dumps({"text": FILL_SENTENCE}).encode()
    assert_ok(post(served, FILL_MASK, body, "application/json"), check_fill_mask)


def test_proposal_cesu8_surrogate_text_is_bad_utf8(served):
    message = assert_error(post(served, SENTIMENT, cesu8_surrogate_text(), "text/plain; charset=utf-8"), 400)
    assert "UTF-8" in message


def test_proposal_multipart_octet_stream_text_and_top_k_field(served):
    # curl -F data=@review.dat -F top_k=2 : the part typed application/octet-stream, the field untyped
    files = {"data": ("review.dat", FILL_SENTENCE.encode(), "application/octet-stream"), "top_k": (None, b"2")}
    assert_ok(post(served, FILL_MASK, files=files), lambda body: check_fill_mask(body, top_k=2))


def test_proposal_multipart_image_with_top_k_field(served):
    # README: -F top_k=3 beside the image part
    files = {"image": ("x.png", good_png(), "image/png"), "top_k": (None, b"3")}
    assert_ok(post(served, "resnet50", files=files), lambda body: check_top5(body, top_k=3))


# --- case 8: mixed batches ------------------------------------------------------------------------


def batches_received(served: Served, model: str) -> int:
    log = served.server.run_folder.log(MODEL_LOG).read_text(errors="replace")
    return sum(1 for line in log.splitlines() if f"-{model}_" in line and "Backend received inference" in line)


def send_together(served: Served, model: str, cases: list[tuple[str, dict, int]]) -> list[requests.Response]:
    """Send every case at once from its own thread; asserts they reached the worker as ONE batch."""
    before = batches_received(served, model)
    with ThreadPoolExecutor(len(cases)) as pool:
        replies = list(pool.map(lambda case: post(served, model, **case[1]), cases))
    deadline = time.monotonic() + 5
    while batches_received(served, model) == before and time.monotonic() < deadline:
        time.sleep(0.2)  # the worker's log line reaches the frontend's log asynchronously
    time.sleep(0.5)
    assert batches_received(served, model) - before == 1, f"the {len(cases)} requests did not share one batch"
    return replies


def send_batch_and_check(served, model: str, cases: list, check_answer) -> list:
    """Send ``cases`` (name, request keywords, expected status) together so they share a batch;
    each must get its own status and body shape."""
    replies = send_together(served, model, cases)
    outcome = {name: (reply.status_code, reply.text[:200]) for (name, _, _), reply in zip(cases, replies)}
    for (name, _, expected), reply in zip(cases, replies):
        body = body_of(reply)
        assert reply.status_code == expected, f"{name}: expected {expected}; all: {outcome}"
        if expected == 200:
            check_answer(body)
        else:
            check_error_body(body, expected)
    return replies


def test_case8_mixed_text_batch(served):
    cases = [
        ("text/plain sentence", {"data": SENTENCE.encode(), "content_type": "text/plain; charset=utf-8"}, 200),
        ("multipart data part", {"files": {"data": ("review.txt", SENTENCE.encode(), "text/plain")}}, 200),
        ("blank multipart data part", {"files": {"data": ("blank.txt", b" \n \n", "text/plain")}}, 400),
        ("lone surrogate JSON", {"data": lone_surrogate_json(), "content_type": "application/json"}, 200),
        ("JSON list", {"json": ["a", "b"]}, 400),
        ("form-urlencoded raw body", {"data": SENTENCE.encode(), "content_type": "application/x-www-form-urlencoded"}, 400),
        ("JSON string body", {"json": SENTENCE}, 200),
        ("zero-width characters only", {"json": {"text": INVISIBLE_TEXTS["zero-width"]}}, 400),
    ]
    replies = send_batch_and_check(served, SENTIMENT, cases, check_sentiment)
    assert "one text per request" in replies[4].json()["message"]
    assert "x-www-form-urlencoded" in replies[5].json()["message"]
    assert_same_workers(served, SENTIMENT)


def test_case8_mixed_image_batch(served):
    cases = [
        ("good PNG", {"data": good_png(), "content_type": "image/png"}, 200),
        ("broken-EXIF JPEG", {"data": broken_exif_jpeg("xresolution_ascii"), "content_type": "image/jpeg"}, 200),
        ("8000x1 PNG", {"data": strip_png(8000), "content_type": "image/png"}, 413),
        ("truncated PNG", {"data": truncated_png(), "content_type": "image/png"}, 400),
        ('{"image": "%%%"}', {"json": {"image": "%%%"}}, 400),
    ]
    replies = send_batch_and_check(served, IMAGE_BATCH, cases, check_top5)
    assert "max_image_pixels" in replies[2].json()["message"]
    assert_same_workers(served, IMAGE_BATCH)


# --- issue 27: compressed bodies, decoding time, containers that lie about their size ---------------

# What one refused request may add to a worker's peak memory: its body and a few copies of it.
# (A lying 62 KB icon added ~300 MiB before it was refused; a 200 KB gzip of 200 MiB, 200 MiB.)
REFUSAL_MEMORY_BYTES = 96 * 1024**2


def peak_memory_growth(pid: int, send) -> tuple[requests.Response, int]:
    """``send()``'s reply and how far the worker's peak resident memory rose above its memory
    before: the kernel's high-water mark (VmHWM), reset to the current size first (clear_refs 5)."""
    def status_kib(field: str) -> int:
        line = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith(field + ":"))
        return int(line.split()[1])

    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = status_kib("VmRSS")
    reply = send()
    return reply, (status_kib("VmHWM") - before) * 1024


@pytest.mark.parametrize("model, data, content_type, check", [
    (FILL_MASK, json.dumps({"text": FILL_SENTENCE}).encode(), "application/json", check_fill_mask),
    (FILL_MASK, FILL_SENTENCE.encode(), "text/plain", check_fill_mask),
    ("resnet50", good_png(), "image/png", check_top5),
    ("resnet50", json.dumps({"image": b64(good_png())}).encode(), "application/json", check_top5),
], ids=["fill_mask_json", "fill_mask_text", "resnet50_png", "resnet50_base64_json"])
def test_a_gzip_body_is_decoded(served, model, data, content_type, check):
    reply = post(served, model, gzipped(data), content_type, headers_extra={"Content-Encoding": "gzip"})
    assert_ok(reply, check)


def test_a_gzip_body_is_answered_like_the_plain_one(served):
    plain = body_of(post(served, FILL_MASK, FILL_SENTENCE.encode(), "text/plain"))
    compressed = post(served, FILL_MASK, gzipped(FILL_SENTENCE.encode()), "text/plain",
                      headers_extra={"Content-Encoding": "gzip"})
    assert body_of(compressed) == plain


@pytest.mark.parametrize("model, content_type", [("resnet50", "image/png"), (FILL_MASK, "application/json")])
def test_a_gzip_bomb_is_refused_having_decoded_at_most_the_body_limit(served, model, content_type):
    bomb = gzip_bomb()
    assert len(bomb) < 300_000
    reply, growth = peak_memory_growth(served.pids[model][0], lambda: post(
        served, model, bomb, content_type, headers_extra={"Content-Encoding": "gzip"}))
    assert "gzip" in assert_error(reply, 413)
    assert growth < REFUSAL_MEMORY_BYTES, f"the worker's peak memory rose by {growth / 2**20:.0f} MiB"
    assert_same_workers(served, model)


@pytest.mark.parametrize("encoding", ["br", "zstd", "deflate"])
def test_an_encoding_not_decoded_is_415_naming_it(served, encoding):
    message = assert_error(post(served, FILL_MASK, b"\x00\x01\x02", "text/plain",
                                headers_extra={"Content-Encoding": encoding}), 415)
    assert encoding in message and "gzip" in message


@pytest.mark.parametrize("body", [b"This phone is <mask>.", gzipped(FILL_SENTENCE.encode())[:-6]],
                         ids=["not_gzip", "truncated_gzip"])
def test_a_body_marked_gzip_that_is_not_complete_gzip_is_400(served, body):
    assert "gzip" in assert_error(post(served, FILL_MASK, body, "text/plain",
                                       headers_extra={"Content-Encoding": "gzip"}), 400)


def test_grpc_request_compression_is_the_transport_s(served, grpc):
    # gRPC compresses messages itself (grpc-encoding), below TorchServe: the handler sees plain bytes.
    reply = grpc.inference.Predictions(grpc._request(FILL_MASK, {"data": FILL_SENTENCE.encode()}), timeout=120,
                                       metadata=grpc._metadata(grpc.inference_token),
                                       compression=grpc_module.Compression.Gzip)
    check_fill_mask(json.loads(reply.prediction))


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding(served, grpc):
    data = many_scans_jpeg()
    assert len(data) < 200_000
    message = assert_error(post(served, "resnet50", data, "image/jpeg"), 413)
    assert "scans" in message and "100" in message
    over_grpc = json.loads(grpc.predict("resnet50", {"data": data}))
    check_error_body(over_grpc, 413)
    assert_same_workers(served, "resnet50")


@pytest.mark.parametrize("model", ["resnet50", "mnist"])
def test_a_progressive_jpeg_is_served(served, model):
    assert_ok(post(served, model, progressive_jpeg(), "image/jpeg"), check_top5)


def test_an_icon_whose_directory_lies_is_refused_before_decoding(served, grpc):
    data = lying_ico()
    reply, growth = peak_memory_growth(served.pids["resnet50"][0], lambda: post(served, "resnet50", data, "image/x-icon"))
    message = assert_error(reply, 400)
    assert "JPEG, PNG" in message and "icons" in message
    assert growth < REFUSAL_MEMORY_BYTES, f"the worker's peak memory rose by {growth / 2**20:.0f} MiB"
    check_error_body(json.loads(grpc.predict("resnet50", {"data": data})), 400)
    assert_same_workers(served, "resnet50")


# The README's bound for one image request: max_image_pixels x 4 bytes plus the same again for a resize.
SERVED_IMAGE_MEMORY_BYTES = 2 * 4 * 4096 * 4096


def gray_png_of(jpeg: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("L").save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


@pytest.mark.parametrize("model, kind", [("mnist", "jpeg"), ("mnist", "png"), ("resnet50", "jpeg")])
def test_a_photo_at_the_pixel_limit_costs_memory_within_the_documented_bound(served, model, kind):
    # before: mnist's worker peaked ~650 MiB higher on the JPEG (its float32 steps ran on the whole image)
    data = progressive_jpeg(side=4000)
    data, content_type = (data, "image/jpeg") if kind == "jpeg" else (gray_png_of(data), "image/png")
    reply, growth = peak_memory_growth(served.pids[model][0], lambda: post(served, model, data, content_type))
    assert_ok(reply, check_top5)
    assert growth < SERVED_IMAGE_MEMORY_BYTES, f"the worker's peak memory rose by {growth / 2**20:.0f} MiB"


# --- case 7: the workers survived everything ----------------------------------------------------


def test_case7_every_worker_survived_and_still_answers(served):
    good = {
        "mnist": ({"data": good_png(28), "content_type": "image/png"}, check_top5),
        "resnet50": ({"data": good_png(), "content_type": "image/png"}, check_top5),
        IMAGE_BATCH: ({"data": good_png(), "content_type": "image/png"}, check_top5),
        SENTIMENT: ({"data": SENTENCE.encode(), "content_type": "text/plain"}, check_sentiment),
        FILL_MASK: ({"data": FILL_SENTENCE.encode(), "content_type": "text/plain"}, check_fill_mask),
    }
    if SERVE_DENSENET:
        good["densenet161"] = ({"data": good_png(), "content_type": "image/png"}, check_top5)
    assert set(good) == set(served.pids)
    for model, (request, check) in good.items():
        assert_ok(post(served, model, **request), check)
    changed = {model: (pids, worker_pids(served.server, model)) for model, pids in served.pids.items()
               if worker_pids(served.server, model) != pids}
    assert not changed, f"workers replaced (model: before, now): {changed}"
