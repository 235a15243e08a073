"""Image decoding shared by the image models: limits first, then any accepted format and mode.

Memory is bounded by ``max_image_pixels`` at every step: the header's pixel count is checked
before any pixel is decoded, and a resize is checked before it runs (``check_resize``), so a tiny
file (a 60000x1 PNG is 100 bytes) cannot make a worker allocate gigabytes. Time is bounded too:
decoding costs pixels x passes, and the only format whose passes the file chooses is progressive
JPEG (one pass per scan), so its scans are counted before decoding (``MAX_JPEG_SCANS``).
"""

from __future__ import annotations

import io
import logging
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from handlers.errors import BadInput, PayloadTooLarge

log = logging.getLogger(__name__)

# The formats a client may send: photos and screenshots (Pillow's JPEG opens a camera's MPO, a
# JPEG with more frames after the first, as format "MPO"). Pillow opens some 40 others; among them are containers whose directory states
# one size while the image inside decodes at its own (ICO/CUR, ICNS: the pixel check would pass on
# the directory and the embedded PNG decode at 8000x8000), and formats handed to other programs
# (EPS runs Ghostscript). For the formats here, the size Pillow reports on open is the size of the
# first frame or page, the only one decoded.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"
# Real encoders write 1 scan (baseline) to about 20 (libjpeg's progressive script: 10 for colour,
# 18 for CMYK; mozjpeg's searched scripts stay near that). A file that repeats its last scan
# thousands of times stays small and makes libjpeg decode the whole image once per scan (2000
# scans of 4000x4000: 19 s). libjpeg-turbo's own fuzzers cap scans at 500; we cap lower.
MAX_JPEG_SCANS = 100
# A JPEG marker: 0xFF then a byte that is not stuffing (00), fill (FF) or a restart marker (D0-D7),
# the bytes that may follow 0xFF inside a scan's entropy-coded data.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")
_JPEG_MARKERS_READ = 10 * MAX_JPEG_SCANS  # a file of more segments than this is refused as well

# 16-bit and 32-bit integer modes, and 32-bit float: PIL's convert() would clip them to 255 (a
# float image in 0..1 would turn black), so scale instead.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def open_image(data: bytes, max_pixels: int, short_side: int | None = None) -> Image.Image:
    """Decode ``data`` into a fully loaded PIL image, upright (EXIF orientation applied).

    The pixel count is checked from the header, before any pixel is decoded, so a
    decompression bomb costs nothing: over ``max_pixels`` is a 413, as is a JPEG of more than
    ``MAX_JPEG_SCANS`` scans; not an image, or not one of ``ACCEPTED_FORMATS``, is a 400.
    ``short_side``: the model resizes to it next, so a JPEG may be decoded at 1/2, 1/4 or 1/8
    scale while both sides stay at least that (libjpeg's DCT scaling, Pillow's ``draft``): a
    12-megapixel phone photo decodes in a fraction of the time.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"the image is {width}x{height} = {width * height} pixels, over this model's "
                    f"limit of {max_pixels}; send a smaller image"
                )
            if image.format in ("JPEG", "MPO"):
                check_jpeg_scans(data)
            image.seek(0)  # animated formats: the first frame
            if short_side and image.format in ("JPEG", "MPO"):
                image.draft(None, (short_side, short_side))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(
            f"the image is too large to decode safely (over {max_pixels} pixels); send a smaller image"
        ) from None
    except UnidentifiedImageError:
        raise BadInput(
            f"the body is not an image in a format this server reads; send {ACCEPTED_NAMES} bytes, "
            "or the same as base64 (icons, AVIF, HEIC, PSD, EPS and other formats: convert them first)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadInput(
            f"the image could not be decoded ({type(exc).__name__}: it may be truncated or corrupt); "
            "send a complete image file"
        ) from None
    if width == 0 or height == 0:
        raise BadInput("the image has no pixels")
    return _upright(image)


def check_jpeg_scans(data: bytes) -> None:
    """413 when the first image of JPEG ``data`` has more than ``MAX_JPEG_SCANS`` scans (start-of-
    scan markers, FF DA), counted by walking its segments: a segment's length skips its payload
    (an EXIF thumbnail's own scans are not counted), a scan's entropy-coded data is skipped up to
    the next marker, and the walk ends at the first end-of-image (an MPO's later frames are not
    decoded). Cost: one regular-expression search per segment; at most ``_JPEG_MARKERS_READ``."""
    scans, position = 0, 2  # after start-of-image
    for _ in range(_JPEG_MARKERS_READ):
        found = _JPEG_MARKER.search(data, position)
        if found is None or data[found.start() + 1] == 0xD9:  # the end, or end-of-image
            return
        marker = data[found.start() + 1]
        scans += marker == 0xDA
        if scans > MAX_JPEG_SCANS:
            break
        standalone = marker in (0x01, 0xD8)  # TEM, SOI: no length follows
        length = 0 if standalone else int.from_bytes(data[found.start() + 2:found.start() + 4], "big")
        position = found.start() + 2 + length
    raise PayloadTooLarge(
        f"the JPEG has more than {MAX_JPEG_SCANS} scans (or {_JPEG_MARKERS_READ} segments), this server's limit: "
        "each scan decodes the whole image again; re-encode it (any encoder writes at most about 20)"
    )


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


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def to_rgb(image: Image.Image, background: tuple[int, int, int] | None = WHITE) -> Image.Image:
    """Any mode to RGB; transparent pixels are laid over ``background`` (None: black or white,
    whichever contrasts with the opaque pixels). Transparency is an alpha channel, a palette's
    alpha or a PNG tRNS key colour on a grayscale or RGB image (any bit depth)."""
    alpha = _key_colour_alpha(image)
    image = _widen_to_8bit(image)
    if alpha is not None:
        image = image.convert("RGB")
        image.putalpha(alpha)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode not in _ALPHA_MODES:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    if background is None:
        background = _contrasting(rgba)
    canvas = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _key_colour_alpha(image: Image.Image) -> Image.Image | None:
    """A tRNS key colour (one gray level or RGB triple that means transparent) as an alpha mask."""
    key = image.info.get("transparency")
    if key is None or image.mode in ("P", "1", *_ALPHA_MODES) or isinstance(key, bytes):
        return None
    pixels = np.asarray(image)
    transparent = pixels == np.asarray(key, dtype=pixels.dtype)
    if transparent.ndim == 3:
        transparent = transparent.all(axis=-1)
    return Image.fromarray(np.where(transparent, 0, 255).astype(np.uint8), mode="L")


def _contrasting(rgba: Image.Image) -> tuple[int, int, int]:
    """Black behind light opaque pixels (a white stroke on a transparent canvas), white otherwise.
    On uint8 planes (Pillow's luma and the alpha): a 4096x4096 canvas costs ~50 MiB, not float copies."""
    opaque = np.asarray(rgba.getchannel("A")) > 127
    if not opaque.any():
        return WHITE
    return BLACK if np.asarray(rgba.convert("L"))[opaque].mean() > 127 else WHITE


def to_gray(image: Image.Image, background: tuple[int, int, int] | None = WHITE) -> Image.Image:
    """Any mode to 8-bit grayscale (L); transparency over ``background`` as in ``to_rgb``."""
    if image.mode == "L" and "transparency" not in image.info:
        return image
    return to_rgb(image, background).convert("L")
