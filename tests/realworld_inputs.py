"""Bodies and files real clients send, for tests/test_real_world_inputs.py.

Everything here is built in memory from fixed values (no randomness, no downloads), so every run
sends the same bytes. Each maker says in its docstring which client or device sends such a thing.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import shutil
import struct
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageOps

from graviton_serve.archive import ArchiveSpec, build_archive, unpack_archive
from tests.images import bomb_png

# --- images ------------------------------------------------------------------------------------

ORIENTATION = 0x0112  # IFD0, SHORT
X_RESOLUTION = 0x011A  # IFD0, RATIONAL
EXIF_IFD = 0x8769  # IFD0, LONG: offset of the Exif IFD
EXIF_VERSION = 0x9000  # Exif IFD, UNDEFINED[4] ("0231")
EXPOSURE_BIAS = 0x9204  # Exif IFD, SRATIONAL

SHORT, LONG, ASCII, RATIONAL, UNDEFINED, SRATIONAL = 3, 4, 2, 5, 7, 10

# What is malformed, beside an unreadable ExposureBiasValue (-1/0, as some phones write it;
# Pillow 12 reads that as NaN and does NOT raise on it alone). Each of these makes
# PIL.ImageOps.exif_transpose raise on Pillow 12.3 while Image.open + load() succeed:
BROKEN_EXIF_KINDS = {
    # IFD0 XResolution stored as ASCII "72" instead of RATIONAL 72/1 (a wrong type):
    # exif_transpose re-serialises the EXIF and raises TypeError (bad operand type for abs(): 'str').
    "xresolution_ascii": ([(X_RESOLUTION, ASCII, 3, b"72\x00")], []),
    # Exif IFD ExifVersion stored as RATIONAL 0/0 instead of UNDEFINED "0231" (a wrong type whose
    # denominator is 0): exif_transpose raises ValueError (cannot convert float NaN to integer).
    "exifversion_rational_0_over_0": ([], [(EXIF_VERSION, RATIONAL, 1, struct.pack("<II", 0, 0))]),
}


def _tiff_ifd(entries: list[tuple[int, int, int, bytes]], start: int, next_blob: int | None = None) -> tuple[bytes, bytes]:
    """One little-endian IFD at offset ``start``: (directory bytes, out-of-line data bytes).
    An entry's raw value of None is the offset ``next_blob`` (the Exif IFD pointer)."""
    entries = sorted(entries, key=lambda entry: entry[0])
    data_start = start + 2 + 12 * len(entries) + 4
    directory, data = struct.pack("<H", len(entries)), b""
    for tag, kind, count, raw in entries:
        if raw is None:
            value = struct.pack("<I", next_blob)
        elif len(raw) <= 4:
            value = raw.ljust(4, b"\x00")
        else:
            value = struct.pack("<I", data_start + len(data))
            data += raw + (b"\x00" if len(raw) % 2 else b"")
        directory += struct.pack("<HHI", tag, kind, count) + value
    return directory + struct.pack("<I", 0), data


def exif_block(orientation: int, ifd0_extra: list, exif_entries: list) -> bytes:
    """An APP1 EXIF payload (``Exif\\0\\0`` + TIFF) with Orientation, the given IFD0 extras and an Exif IFD."""
    ifd0_entries = [(ORIENTATION, SHORT, 1, struct.pack("<H", orientation)), *ifd0_extra, (EXIF_IFD, LONG, 1, None)]
    # Lay IFD0 out once to learn where the Exif IFD starts, then for real.
    directory, data = _tiff_ifd(ifd0_entries, 8, 0)
    exif_start = 8 + len(directory) + len(data)
    directory, data = _tiff_ifd(ifd0_entries, 8, exif_start)
    exif_directory, exif_data = _tiff_ifd(exif_entries, exif_start)
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + directory + data + exif_directory + exif_data


def _photo_like(width: int, height: int) -> Image.Image:
    """A smooth colour picture (deterministic): gradients, like a sky over a field."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 17.0) * np.cos(y / 23.0)], axis=-1)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def broken_exif_jpeg(kind: str) -> bytes:
    """A phone-style JPEG stored sideways (EXIF Orientation 6 = turn 90° clockwise to view) whose
    EXIF also holds ExposureBiasValue -1/0 and the malformed tag ``BROKEN_EXIF_KINDS[kind]``."""
    ifd0_extra, exif_extra = BROKEN_EXIF_KINDS[kind]
    block = exif_block(6, ifd0_extra, [(EXPOSURE_BIAS, SRATIONAL, 1, struct.pack("<ii", -1, 0)), *exif_extra])
    buffer = io.BytesIO()
    _photo_like(320, 240).save(buffer, "JPEG", quality=90, exif=block)
    return buffer.getvalue()


def exif_transpose_error(data: bytes) -> str | None:
    """What PIL.ImageOps.exif_transpose raises on ``data`` with the installed Pillow (None: nothing).
    Raises itself if Image.open/load fail: then the file would test decoding, not EXIF."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = Image.open(io.BytesIO(data))
        image.load()
        try:
            ImageOps.exif_transpose(image)
        except Exception as error:  # noqa: BLE001 - any exception is the answer
            return f"{type(error).__name__}: {error}"
    return None


def png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **options)
    return buffer.getvalue()


def strip_png(width: int, height: int = 1) -> bytes:
    """A black grayscale PNG of width x height: about 100 bytes for 60000x1 (a one-pixel-high
    banner, a barcode scan line, a crafted input)."""
    return png(Image.new("L", (width, height), 0), optimize=True)


def panorama_png(width: int = 4000, height: int = 1000) -> bytes:
    """A wide photo-like panorama (4:1), well under every limit."""
    return png(_photo_like(width, height))


def good_png(side: int = 224) -> bytes:
    return png(_photo_like(side, side))


def truncated_png() -> bytes:
    """The first half of a real PNG (an interrupted upload)."""
    data = png(_photo_like(200, 200))
    return data[: len(data) // 2]


def progressive_jpeg(side: int = 1000) -> bytes:
    """A real progressive JPEG as libjpeg writes it (10 scans), e.g. a web-optimised photo."""
    buffer = io.BytesIO()
    _photo_like(side, side).save(buffer, "JPEG", quality=85, progressive=True)
    return buffer.getvalue()


def scan_count(data: bytes) -> int:
    """Start-of-scan markers in a JPEG written by Pillow (no EXIF, so every FF DA is one)."""
    return data.count(b"\xff\xda")


def many_scans_jpeg(side: int = 4000, scans: int = 2000) -> bytes:
    """A progressive JPEG of side x side whose last scan is repeated until it has ``scans`` scans:
    ~160 KB for 4000x4000 with 2000 scans, and libjpeg decodes the whole image once per scan (a
    crafted input from the "two issues with the JPEG standard" report libjpeg-turbo cites)."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (120, 30, 200)).save(buffer, "JPEG", quality=50, progressive=True)
    data = buffer.getvalue()
    last_scan = data.rindex(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")  # end of image; the last scan's data runs up to it
    repeated = data[:last_scan] + data[last_scan:end] * (scans - scan_count(data) + 1) + data[end:]
    assert scan_count(repeated) == scans
    return repeated


def lying_ico(side: int = 8000) -> bytes:
    """An ICO whose directory says 256x256 while the PNG inside is side x side transparent black
    pixels (~250 KB for 8000x8000 RGBA, 256 MB decoded): Pillow checks the directory's size on open
    and decodes the PNG at its own."""
    embedded = bomb_png(side, channels=4)
    directory = struct.pack("<HHH", 0, 1, 1)  # reserved, type 1 = icon, one image
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(embedded), 6 + 16)  # 0 x 0 means 256 x 256
    return directory + entry + embedded


def gzip_bomb(decoded_bytes: int = 200 * 1024 * 1024) -> bytes:
    """``decoded_bytes`` of zeros gzip-compressed (~200 KB for 200 MiB): a body that is small on the
    wire and huge once decoded."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"\x00" * (1024 * 1024)
    return b"".join(compressor.compress(block) for _ in range(decoded_bytes // len(block))) + compressor.flush()


def gzipped(data: bytes) -> bytes:
    """``data`` as a client with request compression sends it (with Content-Encoding: gzip)."""
    return gzip.compress(data, mtime=0)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_url(data: bytes, mime: str = "image/png") -> str:
    """What a browser's FileReader.readAsDataURL gives."""
    return f"data:{mime};base64,{b64(data)}"


# --- text bodies ---------------------------------------------------------------------------------


def lone_surrogate_json(text: str = "Loved it \ud83d") -> bytes:
    """``{"text": "Loved it \\ud83d"}``: json.dumps' ASCII escaping of a string whose emoji was cut
    in half (a UTF-16 client truncating at a code unit, e.g. a JavaScript substring)."""
    body = json.dumps({"text": text})
    assert "\\ud83d" in body and body.isascii()
    return body.encode("ascii")


def cesu8_surrogate_text() -> bytes:
    """'Loved it ' + the lone surrogate U+D83D encoded the way Java's modified UTF-8 / CESU-8
    writers do (ED A0 BD): not valid UTF-8."""
    return b"Loved it \xed\xa0\xbd"


def deeply_nested_json(depth: int = 100_000) -> bytes:
    """Valid-looking JSON nested deeper than Python's recursion limit (a fuzzer's or a buggy
    serialiser's body): json.loads raises RecursionError, not ValueError."""
    return b"[" * depth + b"]" * depth


# --- archives ------------------------------------------------------------------------------------


def archive_variant(archive: Path, export_dir: Path, name: str, torchserve_keys: dict) -> Path:
    """``archive`` repackaged as model ``name`` with the given TorchServe keys of model-config.yaml
    changed (batchSize, maxBatchDelay, ...); the ``handler:`` section, weights, tokenizer and
    metadata stay as they are. The handler code is this checkout's handlers/ (as build_archive
    packs it, like tests/conftest.py's mnist_variant), so the variant serves the code under test."""
    if "handler" in torchserve_keys:
        raise ValueError("archive_variant changes TorchServe keys only; the handler section stays as it is")
    with tempfile.TemporaryDirectory(prefix=f"gs-variant-{name}-") as work:
        folder = Path(work) / "unpacked"
        manifest = unpack_archive(archive, folder)
        model = manifest["model"]
        config_name = model.get("configFile", "model-config.yaml")
        config = yaml.safe_load((folder / config_name).read_text()) or {}
        config.update(torchserve_keys)
        handler_file = model["handler"].split(":")[0]
        metadata_file = folder / "metadata.json"
        metadata = json.loads(metadata_file.read_text()) if metadata_file.exists() else {"model": name}
        kept_out = {"MAR-INF", "handlers", "__pycache__", model["serializedFile"], handler_file, config_name, "metadata.json"}
        staged = Path(work) / "extras"
        staged.mkdir()
        extras = []
        for path in sorted(folder.iterdir()):
            if path.name not in kept_out:
                target = staged / path.name
                (shutil.copytree if path.is_dir() else shutil.copy2)(path, target)
                extras.append(target)
        weights = Path(work) / model["serializedFile"]
        shutil.copy2(folder / model["serializedFile"], weights)
        spec = ArchiveSpec(name=name, handler_module=Path(handler_file).stem, weights=weights, model_config=config,
                           metadata=metadata, extra_files=extras)
        return build_archive(spec, export_dir)
