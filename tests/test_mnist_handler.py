"""The MNIST handler in-process through TorchServe's Service, on the real demo archive."""

from __future__ import annotations

import base64

import pytest

from graviton_serve.demos.mnist import split_digits
from tests.images import bomb_png, png, truncated_png, variants
from tests.inprocess import load_service, predict, request


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return load_service(mnist_dir, "mnist.py", name="mnist")


@pytest.fixture(scope="module")
def held_out():
    split = split_digits()
    return split.held_out_images, split.held_out_labels


def top1(reply) -> str:
    return next(iter(reply.json()))


def test_top5_dict_highest_first(mnist, held_out):
    images, labels = held_out
    (reply,) = predict(mnist, [request(png(images[0]))])
    result = reply.json()
    assert reply.status == 200
    assert len(result) == 5
    assert list(result.values()) == sorted(result.values(), reverse=True)
    assert set(result) <= {str(d) for d in range(10)}
    assert top1(reply) == str(labels[0])


def test_every_format_and_mode_gives_the_same_answer(mnist, held_out):
    images, labels = held_out
    # Digits the model gets right as plain PNG; each must survive every conversion.
    for index in range(0, 60, 6):
        forms = variants(images[index])
        replies = predict(mnist, [request(data) for data in forms.values()])
        answers = {name: (reply.status, top1(reply) if reply.status == 200 else reply.body) for name, reply in zip(forms, replies)}
        assert all(status == 200 for status, _ in answers.values()), answers
        assert {answer for _, answer in answers.values()} == {str(labels[index])}, answers


def test_base64_json_and_form_options(mnist, held_out):
    images, _ = held_out
    data = png(images[1])
    encoded = base64.b64encode(data).decode()
    replies = predict(mnist, [
        request(encoded.encode(), "text/plain"),
        request({"image": encoded, "top_k": 2}, "application/json"),
        request(data, top_k=b"3"),
        request({"image": encoded, "top_k": 0}, "application/json"),
    ])
    assert [r.status for r in replies] == [200, 200, 200, 400]
    assert [len(r.json()) for r in replies[:3]] == [5, 2, 3]
    assert "top_k" in replies[3].json()["message"]


def test_bad_inputs_fail_alone_in_a_batch_of_good_ones(mnist, held_out):
    images, labels = held_out
    good = [png(images[i]) for i in (2, 3, 4)]
    replies = predict(mnist, [
        request(good[0]),
        request(b""),
        request(b"this is not an image"),
        request(truncated_png()),
        request(good[1]),
        request(bomb_png()),
        request(b"{broken json", "application/json"),
        request(good[2]),
    ])
    assert [r.status for r in replies] == [200, 400, 400, 400, 200, 413, 400, 200]
    assert [top1(replies[i]) for i in (0, 4, 7)] == [str(labels[i]) for i in (2, 3, 4)]
    for reply in replies:
        if reply.status != 200:
            body = reply.json()
            assert set(body) == {"code", "type", "message"} and body["code"] == reply.status


def test_describe_carries_held_out_accuracy(mnist):
    (reply,) = predict(mnist, [request(b"", headers={"describe": "True"})])
    metadata = reply.json()
    assert metadata["trained"] is True and metadata["held_out_accuracy"] >= 0.97
