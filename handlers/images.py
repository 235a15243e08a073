"""Image decoding shared by the image models: size limits first, then any format and mode.

Memory is bounded by ``max_image_pixels`` at every step: the header's pixel count is checked
before any pixel is decoded, and a resize is checked before it runs (``check_resize``), so a tiny
file (a 60000x1 PNG is 100 bytes) cannot make a worker allocate gigabytes.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from handlers.errors import BadInput, PayloadTooLarge

log = logging.getLogger(__name__)

# 16-bit and 32-bit integer modes, and 32-bit float: PIL's convert() would clip them to 255 (a
# float image in 0..1 would turn black), so scale instead.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def open_image(data: bytes, max_pixels: int, short_side: int | None = None) -> Image.Image:
    """Decode ``data`` into a fully loaded PIL image, upright (EXIF orientation applied).

    The pixel count is checked from the header, before any pixel is decoded, so a
    decompression bomb costs nothing: over ``max_pixels`` is a 413, not an image is a 400.
    ``short_side``: the model resizes to it next, so a JPEG may be decoded at 1/2, 1/4 or 1/8
    scale while both sides stay at least that (libjpeg's DCT scaling, Pillow's ``draft``): a
    12-megapixel phone photo decodes in a fraction of the time.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"the image is {width}x{height} = {width * height} pixels, over this model's "
                    f"limit of {max_pixels}; send a smaller image"
                )
            image.seek(0)  # animated formats: the first frame
            if short_side and image.format == "JPEG":
                image.draft(None, (short_side, short_side))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(
            f"the image is too large to decode safely (over {max_pixels} pixels); send a smaller image"
        ) from None
    except UnidentifiedImageError:
        raise BadInput(
            "the body is not an image this server can read; send PNG, JPEG, WebP, BMP, GIF or TIFF bytes, "
            "or the same as base64"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadInput(
            f"the image could not be decoded ({type(exc).__name__}: it may be truncated or corrupt); "
            "send a complete image file"
        ) from None
    if width == 0 or height == 0:
        raise BadInput("the image has no pixels")
    return _upright(image)


def _upright(image: Image.Image) -> Image.Image:
    """EXIF orientation applied; metadata is best effort, so an EXIF block Pillow cannot parse
    (phones write malformed values, e.g. a rational with denominator 0) leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - any failure in the metadata parser: serve the pixels
        log.debug("EXIF orientation not applied (%s); the image is used as stored", type(error).__name__)
        return image


def check_resize(size: tuple[int, int], short_side: int, max_pixels: int) -> None:
    """413 before resizing an image of ``size`` so that its short side is ``short_side`` would
    make more than ``max_pixels`` pixels (an extreme aspect ratio: 8000x1 -> 1856000x232)."""
    width, height = size
    scale = short_side / min(width, height)
    resized = round(width * scale) * round(height * scale)
    if resized > max_pixels:
        raise PayloadTooLarge(
            f"the image is {width}x{height}; resizing its short side to {short_side} px would make "
            f"{resized} pixels, over this model's limit of {max_pixels} (max_image_pixels); send an image "
            f"closer to square (aspect ratio at most {max_pixels // short_side ** 2}:1)"
        )


def _widen_to_8bit(image: Image.Image) -> Image.Image:
    if image.mode not in _WIDE_MODES:
        return image
    pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))
    if image.mode == "F" and pixels.max() <= 1.0:
        top = 1.0  # a float image in 0..1
    else:
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
    return Image.fromarray(np.clip(pixels / top * 255.0, 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any mode to RGB; transparent pixels are laid over ``background``."""
    image = _widen_to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def to_gray(image: Image.Image) -> Image.Image:
    """Any mode to 8-bit grayscale (L); transparency over white."""
    if image.mode == "L":
        return image
    return to_rgb(image).convert("L")
