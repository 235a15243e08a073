"""Test images built from real MNIST digits: every format, mode and kind of bad input."""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
    return encode(Image.fromarray(pixels), "PNG")


def variants(digit: np.ndarray) -> dict[str, bytes]:
    """One digit (28x28 uint8, white on black) in many formats, modes and sizes."""
    gray = Image.fromarray(digit)
    big = gray.resize((280, 280), Image.BILINEAR)
    inverted_big_rgb = Image.fromarray(255 - np.asarray(big)).convert("RGB")
    rgba = Image.merge("RGBA", [Image.new("L", gray.size, 0)] * 3 + [gray])  # black ink on transparency
    white_stroke = Image.merge("RGBA", [Image.new("L", gray.size, 255)] * 3 + [gray])  # a canvas app's export
    sixteen = Image.fromarray(digit.astype(np.uint16) * 257)
    rotated = gray.rotate(90, expand=True)  # stored turned; EXIF orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "png_L": png(digit),
        "jpeg_RGB_dark_on_white_280": encode(inverted_big_rgb, "JPEG", quality=95),
        "webp_RGB": encode(big.convert("RGB"), "WEBP", lossless=True),
        "bmp_L": encode(gray, "BMP"),
        "gif_P": encode(gray.convert("P"), "GIF"),
        "png_LA": encode(Image.merge("LA", [gray, Image.new("L", gray.size, 255)]), "PNG"),
        "png_RGBA_black_ink_on_transparent": encode(rgba, "PNG"),
        "png_RGBA_white_ink_on_transparent": encode(white_stroke, "PNG"),
        # a tRNS key colour: the background level/colour itself is marked transparent
        "png_L_tRNS_black_key": encode(gray, "PNG", transparency=0),
        "png_RGB_tRNS_black_key": encode(gray.convert("RGB"), "PNG", transparency=(0, 0, 0)),
        "png_RGB_tRNS_white_key_dark_ink": encode(inverted_big_rgb, "PNG", transparency=(255, 255, 255)),
        "png_I16_tRNS_black_key": encode(sixteen, "PNG", transparency=0),
        "png_P_tRNS": encode(gray.convert("P"), "PNG", transparency=0),
        "tiff_CMYK": encode(big.convert("RGB").convert("CMYK"), "TIFF"),
        "png_I16": encode(sixteen, "PNG"),
        "jpeg_exif_rotated": encode(rotated.convert("RGB"), "JPEG", quality=95, exif=exif),
    }


def truncated_png() -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8)
    data = png(noise)
    return data[: len(data) // 2]


@functools.lru_cache(maxsize=None)
def bomb_png(side: int = 20000, channels: int = 1) -> bytes:
    """A real PNG of side x side black pixels, grayscale (1 channel) or RGBA (4): a few hundred KB
    that decode to side^2 x channels bytes."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (side * channels + 1)  # filter byte + channels bytes per pixel
    parts = [compressor.compress(row * 1000) for _ in range(side // 1000)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 8, {1: 0, 4: 6}[channels], 0, 0, 0)  # 8-bit gray or RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
