"""Request decoding (handlers/payload.py) and image decoding (handlers/images.py)."""

from __future__ import annotations

import base64
import gzip
import io

import numpy as np
import pytest
from PIL import Image

from handlers.errors import BadInput, PayloadTooLarge
from graviton_serve.paths import ROOT
from handlers.images import MAX_JPEG_SCANS, check_jpeg_scans, check_resize, open_image, to_gray, to_rgb
from handlers.content_encoding import MAX_DECODED_BODY_BYTES
from handlers.payload import Payload
from handlers.settings import positive_int
from tests.images import bomb_png, encode, png, truncated_png

DIGIT = (np.arange(28 * 28).reshape(28, 28) % 256).astype(np.uint8)
PNG = png(DIGIT)


def test_raw_bytes_base64_text_json_and_data_url_give_the_same_bytes():
    encoded = base64.b64encode(PNG).decode()
    assert Payload.from_request({"body": PNG}).binary("image") == PNG
    assert Payload.from_request({"body": encoded}).binary("image") == PNG
    assert Payload.from_request({"body": encoded.encode()}).binary("image") == PNG
    assert Payload.from_request({"body": {"image": encoded}}).binary("image") == PNG
    assert Payload.from_request({"body": {"image": "data:image/png;base64," + encoded}}).binary("image") == PNG
    assert Payload.from_request({"upload": PNG}).binary("image") == PNG  # a lone multipart part
    with_option = Payload.from_request({"image": PNG, "top_k": "3"})  # curl -F image=@x.png -F top_k=3
    assert with_option.binary("image") == PNG and with_option.option("top_k", positive_int(10), 5) == 3


def test_malformed_json_is_a_bad_input_naming_the_problem():
    payload = Payload.from_request({"body": b"{not json"}, {"body": {"content-type": "application/json"}})
    with pytest.raises(BadInput, match="not valid JSON"):
        payload.binary("image")


@pytest.mark.parametrize("body, message", [
    (b"", "empty"),
    ({"picture": "abc"}, "no 'image' field"),
    ({"image": "%%%"}, "not valid base64"),
    ({"image": 12}, "base64 string"),
])
def test_unusable_bodies_are_bad_input(body, message):
    with pytest.raises(BadInput, match=message):
        Payload.from_request({"body": body}).binary("image")


def test_options_come_from_json_or_form_fields_and_are_validated():
    parse = positive_int(10)
    assert Payload.from_request({"body": {"top_k": 3}}).option("top_k", parse, 5) == 3
    assert Payload.from_request({"body": PNG, "top_k": b"2"}).option("top_k", parse, 5) == 2
    assert Payload.from_request({"body": PNG}).option("top_k", parse, 5) == 5
    for bad in (0, 11, "x", True, 2.5):
        with pytest.raises(BadInput, match="option 'top_k'"):
            Payload.from_request({"body": {"top_k": bad}}).option("top_k", parse, 5)


def test_decompression_bomb_is_rejected_before_decoding():
    with pytest.raises(PayloadTooLarge, match="smaller image"):
        open_image(bomb_png(), max_pixels=16_777_216)


def test_pixel_limit_is_checked_from_the_header():
    with pytest.raises(PayloadTooLarge, match="100x100 = 10000 pixels"):
        open_image(png(np.zeros((100, 100), np.uint8)), max_pixels=9_999)


@pytest.mark.parametrize("data", [b"hello", b"\x89PNG\r\n\x1a\n", truncated_png()])
def test_not_an_image_or_truncated_is_bad_input(data):
    with pytest.raises(BadInput):
        open_image(data, max_pixels=16_777_216)


def test_modes_convert_without_clipping_or_losing_ink():
    sixteen = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert np.asarray(to_gray(sixteen)).min() == 255
    transparent_black_ink = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    transparent_black_ink.putpixel((1, 1), (0, 0, 0, 255))
    gray = np.asarray(to_gray(transparent_black_ink))
    assert gray[1, 1] == 0 and gray[0, 0] == 255  # ink stays dark, transparency becomes white
    assert to_rgb(Image.new("CMYK", (2, 2))).mode == "RGB"
    unit_float = Image.fromarray(np.full((4, 4), 0.5, np.float32))  # a float TIFF in 0..1
    assert np.asarray(to_gray(unit_float)).min() == 127


@pytest.mark.parametrize("mode, key, colour", [("RGB", (10, 20, 30), (10, 20, 30)), ("L", 7, 7),
                                               ("I;16", 7 * 257, 7 * 257)])
def test_a_trns_key_colour_is_transparency(mode, key, colour):
    image = Image.new(mode, (4, 4), colour)
    image.putpixel((1, 1), (200, 200, 200) if mode == "RGB" else 200 * (257 if mode == "I;16" else 1))
    decoded = Image.open(io.BytesIO(encode(image, "PNG", transparency=key)))
    assert "transparency" in decoded.info
    rgb = np.asarray(to_rgb(decoded))
    assert (rgb[0, 0] == 255).all() and (rgb[1, 1] == 200).all()  # the key colour is the background now
    assert (np.asarray(to_rgb(decoded, background=(0, 0, 0)))[0, 0] == 0).all()


def test_transparency_can_read_as_the_background_that_contrasts_with_the_stroke():
    white_stroke = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    white_stroke.putpixel((1, 1), (255, 255, 255, 255))
    gray = np.asarray(to_gray(white_stroke, background=None))
    assert gray[1, 1] == 255 and gray[0, 0] == 0
    dark_stroke = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    dark_stroke.putpixel((1, 1), (0, 0, 0, 255))
    gray = np.asarray(to_gray(dark_stroke, background=None))
    assert gray[1, 1] == 0 and gray[0, 0] == 255


def test_what_torchserve_parsed_is_never_parsed_again():
    encoded = base64.b64encode(PNG).decode()
    as_json = {"body": {"content-type": "application/json"}}
    assert Payload.from_request({"body": encoded}, as_json).binary("image") == PNG  # a JSON string body
    with pytest.raises(BadInput, match="one image per request"):
        Payload.from_request({"body": [encoded, encoded]}, as_json).binary("image")
    for scalar in (42, 2.5, True):
        with pytest.raises(BadInput, match="a number, not an image|a boolean, not an image"):
            Payload.from_request({"body": scalar}, as_json).binary("image")


def test_a_form_body_is_named_as_the_cause():
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    with pytest.raises(BadInput, match="x-www-form-urlencoded"):
        Payload.from_request({"iVBORw0KGgo": b""}, form).binary("image")
    assert Payload.from_request({"image": PNG}, form).binary("image") == PNG  # a field named image is the image


def test_a_resize_is_checked_before_it_runs():
    check_resize((4000, 1000), 232, 16_777_216)  # a panorama: 928 x 232
    with pytest.raises(PayloadTooLarge, match=r"8000x1; resizing its short side to 232 px would make 430592000 pixels"):
        check_resize((8000, 1), 232, 16_777_216)


def test_messages_name_what_is_missing_without_echoing_the_input():
    with pytest.raises(BadInput, match="none is named body, data, image"):
        Payload.from_request({"photo": PNG, "top_k": b"2"}).binary("image")  # curl -F photo=@x.png -F top_k=2
    with pytest.raises(BadInput, match="JSON body is null"):
        Payload.from_request({"body": None}, {"body": {"content-type": "application/json"}}).binary("image")
    with pytest.raises(BadInput) as error:
        Payload.from_request({"body": PNG, "top_k": b"abc"}).option("top_k", positive_int(10), 5)
    assert "abc" not in error.value.message and "integer from 1 to 10" in error.value.message
    data_url = b"data:image/png;base64," + base64.b64encode(PNG)
    assert Payload.from_request({"body": data_url}).binary("image") == PNG  # a data URL sent as raw bytes


def test_a_gzip_body_decodes_to_at_most_what_torchserve_accepts_plain():
    properties = dict(line.split("=", 1) for line in (ROOT / "config.properties").read_text().splitlines()
                      if "=" in line and not line.startswith("#"))
    assert MAX_DECODED_BODY_BYTES == int(properties["max_request_size"])


def test_gzip_members_and_layers_are_all_decoded():
    two_members = gzip.compress(b"This phone ") + gzip.compress(b"is great")
    assert Payload(two_members, "text/plain", content_encoding="gzip").text(("text",), 100) == "This phone is great"
    twice = gzip.compress(gzip.compress(b"This phone is great"))
    assert Payload(twice, "text/plain", content_encoding="gzip, gzip").text(("text",), 100) == "This phone is great"
    assert Payload(b"plain", "text/plain", content_encoding="identity").text(("text",), 100) == "plain"


def test_jpeg_scans_are_counted_by_segments_not_by_bytes():
    # bytes inside a segment (an EXIF thumbnail's own scans, a comment) are skipped by its length
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, "JPEG", progressive=True, comment=b"\xff\xda" * 200)
    data = buffer.getvalue()
    assert data.count(b"\xff\xda") > MAX_JPEG_SCANS
    check_jpeg_scans(data)  # 10 real scans: no error
    assert open_image(data, 10_000).size == (64, 64)
