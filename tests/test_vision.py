"""ResNet/DenseNet: preprocessing from torchvision's weights, label mapping, the input matrix."""

from __future__ import annotations

import base64
import zipfile

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from graviton_serve.demo_store import build_demo_store
from graviton_serve.families import family
from graviton_serve.paths import HANDLERS_DIR, MODEL_STORE
from graviton_serve.sample_data import PHOTOS, photo
from handlers.image_classification import distinct_names
from handlers.images import open_image
from tests.images import bomb_png, encode, truncated_png
from tests.inprocess import load_model_dir, load_service, predict, request

GOLDEN_RETRIEVER = 207


def unpack(archive, folder):
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(folder)
    return folder


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory):
    (archive,) = build_demo_store(MODEL_STORE, ["resnet50"])
    service = load_service(unpack(archive, tmp_path_factory.mktemp("resnet50")), "vision.py", name="resnet50")
    return service


@pytest.fixture(scope="module")
def rigged_resnet18(tmp_path_factory):
    """A ResNet18 whose last layer makes 'golden retriever' win whatever the image."""
    folder = tmp_path_factory.mktemp("rigged")
    network = torchvision.models.resnet18(weights=None, num_classes=1000)
    with torch.no_grad():
        network.fc.weight.zero_()
        network.fc.bias.zero_()
        network.fc.bias[GOLDEN_RETRIEVER] = 10.0
        network.fc.bias[1] = 9.0  # goldfish second
    torch.save(network.state_dict(), folder / "model.pt")
    load_model_dir(folder, HANDLERS_DIR / "vision.py", "rigged", family("vision").model_config(architecture="resnet18", weights="IMAGENET1K_V1"), "model.pt")
    return load_service(folder, "vision.py", name="rigged")


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_preprocessing_equals_the_weights_own_transforms(resnet50, name):
    handler = resnet50._entry_point.worker.handler
    path = photo(name)
    ours = handler.image_to_tensor(open_image(path.read_bytes(), handler.max_pixels))
    reference = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()(Image.open(path).convert("RGB"))
    assert ours.shape == (3, 224, 224)
    assert torch.equal(ours, reference)


def test_labels_map_end_to_end(rigged_resnet18):
    (reply,) = predict(rigged_resnet18, [request(photo("coffee").read_bytes())])
    result = reply.json()
    assert reply.status == 200
    assert list(result)[:2] == ["golden retriever", "goldfish"]
    assert len(result) == 5 and result["golden retriever"] > 0.5


def photo_variants() -> dict[str, bytes]:
    rgb = Image.open(photo("chelsea")).convert("RGB")
    small = rgb.resize((160, 120))
    exif = Image.Exif()
    exif[0x0112] = 3  # stored upside down
    return {
        "jpeg": photo("flower").read_bytes(),
        "png": photo("chelsea").read_bytes(),
        "webp": encode(small, "WEBP"),
        "bmp": encode(small, "BMP"),
        "gif_first_frame": encode(small.convert("P"), "GIF", save_all=True, append_images=[small.convert("P").rotate(90)]),
        "L": encode(small.convert("L"), "PNG"),
        "LA": encode(small.convert("LA"), "PNG"),
        "RGBA": encode(small.convert("RGBA"), "PNG"),
        "P": encode(small.convert("P"), "PNG"),
        "CMYK": encode(small.convert("CMYK"), "JPEG"),
        "16-bit": encode(Image.fromarray(np.asarray(small.convert("L")).astype(np.uint16) * 257), "PNG"),
        "exif_rotated": encode(small.rotate(180), "JPEG", exif=exif),
        "base64": base64.b64encode(encode(small, "PNG")),
    }


def test_every_format_and_mode_is_answered(resnet50):
    forms = photo_variants()
    replies = predict(resnet50, [request(data) for data in forms.values()])
    for name, reply in zip(forms, replies):
        assert reply.status == 200, (name, reply.body)
        assert len(reply.json()) == 5, name


def test_exif_orientation_is_applied(rigged_resnet18, resnet50):
    handler = resnet50._entry_point.worker.handler
    upright = Image.open(photo("chelsea")).convert("RGB").resize((160, 120))
    exif = Image.Exif()
    exif[0x0112] = 3
    stored = encode(upright.rotate(180), "PNG", exif=exif)
    decoded = open_image(stored, handler.max_pixels)
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(upright))


def test_only_names_that_several_classes_share_get_their_class_index():
    # timm's ImageNet table names 134 (the bird) and 517 (the machine) both "crane"; in a
    # {name: probability} answer one would overwrite the other. torchvision's table has no such pair.
    assert distinct_names(["crane", "tabby", "crane"]) == ["crane (class 0)", "tabby", "crane (class 2)"]
    categories = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    assert distinct_names(categories) == categories


def test_json_body_and_top_k(resnet50):
    data = base64.b64encode(photo("coffee").read_bytes()).decode()
    replies = predict(resnet50, [request({"image": data, "top_k": 3}, "application/json"),
                                 request(photo("coffee").read_bytes(), top_k=b"10")])
    assert [len(r.json()) for r in replies] == [3, 10]


def test_bomb_and_garbage_fail_alone_in_a_batch_of_good_images(resnet50):
    good = photo("flower").read_bytes()
    replies = predict(resnet50, [request(good), request(bomb_png()), request(b"\x00garbage" * 100),
                                 request(truncated_png()), request(good)])
    assert [r.status for r in replies] == [200, 413, 400, 400, 200]
    assert replies[0].json() == replies[4].json()
    assert replies[1].json()["type"] == "PayloadTooLarge"


def test_unknown_architecture_or_weights_is_named():
    from handlers.vision import architecture_name, weights_entry

    with pytest.raises(ValueError, match="vit_b_16"):
        architecture_name("vit_b_16")
    with pytest.raises(ValueError, match="handler.weights.*IMAGENET1K_V1"):
        weights_entry("densenet161", "IMAGENET1K_V9")


@pytest.mark.parametrize("size", [(8000, 1), (1, 60000)])
def test_an_extreme_aspect_ratio_is_refused_before_the_resize(resnet50, size):
    # ~100 bytes of PNG; resized to a short side of 232 it would be 1,856,000 x 232 pixels (gigabytes).
    tiny = encode(Image.new("RGB", size, (120, 30, 200)), "PNG")
    replies = predict(resnet50, [request(tiny), request(photo("flower").read_bytes()),
                                 request({"image": base64.b64encode(tiny).decode()}, "application/json")])
    assert [r.status for r in replies] == [413, 200, 413]
    assert replies[0].json()["type"] == "PayloadTooLarge" and "max_image_pixels" in replies[0].json()["message"]


def test_a_panorama_within_the_bound_is_served(resnet50):
    (reply,) = predict(resnet50, [request(encode(Image.new("RGB", (4000, 1000), (10, 200, 30)), "JPEG"))])
    assert reply.status == 200 and len(reply.json()) == 5
