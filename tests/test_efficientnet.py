"""efficientnet_lite0, the demo vision model with real ImageNet weights: its weights, its
preprocessing (timm's), and the image path checked against a model whose answers mean something."""

from __future__ import annotations

import base64
import io
import zipfile

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from graviton_serve.demo_store import build_demo_store
from graviton_serve.paths import MODEL_STORE
from graviton_serve.sample_data import PHOTOS, photo
from handlers.cpu_features import CpuFeatures
from handlers.images import open_image
from tests.images import encode
from tests.inprocess import load_service, predict, request

# What each packaged photo shows, as ImageNet classes (chosen from the picture, not from the
# model's answers); one of them must be in the top 5. ImageNet has no "motorcycle" class, and
# none for the astronaut photo (left out).
EXPECTED = {
    "flower": {"daisy"},
    "china": {"palace", "pagoda"},
    "coffee": {"espresso", "cup", "coffee mug"},
    "chelsea": {"tabby", "tiger cat", "Egyptian cat"},
    "motorcycle": {"moped", "motor scooter"},
    "grace_hopper": {"military uniform"},
}


def first_name(label: str) -> str:
    return label.split(",")[0]  # timm's category names list synonyms: "tabby, tabby cat"


@pytest.fixture(scope="module")
def efficientnet(tmp_path_factory):
    (archive,) = build_demo_store(MODEL_STORE, ["efficientnet_lite0"])
    folder = tmp_path_factory.mktemp("efficientnet_lite0")
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(folder)
    return load_service(folder, "timm_vision.py", name="efficientnet_lite0")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_packaged_photo_gets_its_class_in_the_top_5(efficientnet, name):
    (reply,) = predict(efficientnet, [request(photo(name).read_bytes())])
    assert reply.status == 200, reply.body
    top5 = [first_name(label) for label in reply.json()]
    assert EXPECTED[name] & set(top5), top5


def test_preprocessing_is_timms_own_for_the_model(efficientnet):
    handler = efficientnet._entry_point.worker.handler
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    reference = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    path = photo("chelsea")
    ours = handler.image_to_tensor(open_image(path.read_bytes(), handler.max_pixels))
    assert ours.shape == (3, 224, 224)
    assert torch.equal(ours, reference(Image.open(path).convert("RGB")))


def encodings_of(image: Image.Image) -> dict[str, bytes]:
    """The same photo as a client may send it: every format and mode the issue named."""
    rgb = image.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 3  # stored upside down; EXIF orientation 3 turns it back
    key = tuple(int(v) for v in np.asarray(rgb)[0, 0])  # one real colour of the photo marked transparent
    png = encode(rgb, "PNG")
    return {
        "jpeg_baseline": encode(rgb, "JPEG", quality=92),
        "jpeg_progressive": encode(rgb, "JPEG", quality=92, progressive=True),
        "jpeg_cmyk": encode(rgb.convert("CMYK"), "JPEG", quality=92),
        "jpeg_exif_rotated": encode(rgb.rotate(180), "JPEG", quality=92, exif=exif),
        "png_rgb": png,
        "png_rgba": encode(rgb.convert("RGBA"), "PNG"),
        "png_palette": encode(rgb.quantize(256), "PNG"),
        "png_palette_trns": encode(rgb.quantize(256), "PNG", transparency=0),
        "png_rgb_trns_key": encode(rgb, "PNG", transparency=key),
        "png_gray": encode(rgb.convert("L"), "PNG"),
        "png_gray_16bit": encode(Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257), "PNG"),
        "webp_lossless": encode(rgb, "WEBP", lossless=True),
        "bmp": encode(rgb, "BMP"),
        "tiff": encode(rgb, "TIFF"),
        "base64_text": base64.b64encode(png),
    }


def test_every_encoding_of_a_photo_gets_the_same_top_1(efficientnet):
    coffee = Image.open(photo("coffee"))
    plain = encode(coffee.convert("RGB"), "PNG")
    forms = encodings_of(coffee)
    data_url = "data:image/png;base64," + base64.b64encode(plain).decode()
    replies = predict(efficientnet, [request(plain), *[request(data) for data in forms.values()],
                                     request({"image": base64.b64encode(plain).decode()}, "application/json"),
                                     request({"image": data_url}, "application/json")])
    names = ["plain", *forms, "json_base64", "json_data_url"]
    answers = {name: (reply.status, next(iter(reply.json())) if reply.status == 200 else reply.body)
               for name, reply in zip(names, replies)}
    assert {answer for _, answer in answers.values()} == {"espresso"}, answers


def test_the_weights_are_the_packages_renamed_onto_timm(efficientnet):
    from graviton_serve.demos.vision import EFFICIENTNET_LITE0_FILE
    from graviton_serve.sample_data import package_file

    theirs = torch.load(package_file(*EFFICIENTNET_LITE0_FILE), map_location="cpu", weights_only=True)
    ours = efficientnet._entry_point.worker.model.state_dict()
    assert len(theirs) == len(ours)
    assert all(torch.equal(a, b) for a, b in zip(ours.values(), theirs.values()))


@pytest.mark.cpu_sensitive  # bf16 is a candidate only where the CPU has it: run again as other CPUs
def test_the_precision_choice_is_guarded_on_the_archives_real_photos(efficientnet):
    worker = efficientnet._entry_point.worker
    checks = worker.handler.check_inputs()
    assert len(worker.handler.check_photos) == len(PHOTOS) and len(checks) == 6 + len(PHOTOS)
    if CpuFeatures.detect().bf16:
        # each check input through bf16 in one batch and alone, against fp32: the guard's figure
        assert "with fp32 on " in worker.precision_why and f"of {2 * len(checks)}" in worker.precision_why, worker.precision_why
        assert worker.precision in ("bf16", "fp32")
    else:
        assert worker.precision == "fp32"


def test_every_class_is_in_a_full_top_k_once_and_in_order(efficientnet):
    # timm's table names two classes "crane" (134 the bird, 517 the machine): both must be answered.
    (reply,) = predict(efficientnet, [request({"image": base64.b64encode(photo("coffee").read_bytes()).decode(),
                                               "top_k": 1000}, "application/json")])
    scores = list(reply.json().values())
    assert reply.status == 200 and len(scores) == 1000
    assert scores == sorted(scores, reverse=True)
    assert {"crane (class 134)", "crane (class 517)"} <= set(reply.json())
