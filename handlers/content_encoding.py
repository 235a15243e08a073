"""A request body's HTTP Content-Encoding, undone: gzip is decoded, bounded; nothing else is accepted.

TorchServe's frontend passes a compressed body on as it came, so a worker sees the gzip bytes.
"""

from __future__ import annotations

import zlib
from typing import Any

from handlers.errors import BadInput, PayloadTooLarge, UnsupportedMediaType

# A gzip body may decode to at most what a plain body may be: TorchServe's max_request_size in
# config.properties (16 MiB), so a small gzip of gigabytes of zeros costs at most this much.
MAX_DECODED_BODY_BYTES = 16 * 1024 * 1024
GZIP_NAMES = ("gzip", "x-gzip")


def decode_content(body: Any, content_encoding: str) -> Any:
    """``body`` with ``content_encoding`` (the header's value, lower case) undone: gzip, any number
    of times as listed, decoded up to ``MAX_DECODED_BODY_BYTES`` (413 beyond); a body marked gzip
    that is not complete gzip data is a 400; any other encoding a 415 naming it."""
    codings = [c.strip() for c in content_encoding.split(",") if c.strip() not in ("", "identity")]
    unknown = [c for c in codings if c not in GZIP_NAMES]
    if unknown:
        raise UnsupportedMediaType(
            f"the body is sent with Content-Encoding '{unknown[0][:40]}', which this server does not decode; "
            "send it uncompressed or gzip-compressed (Content-Encoding: gzip)")
    if not codings or body is None:
        return body
    if not isinstance(body, (bytes, bytearray)):
        raise BadInput("the body is marked Content-Encoding: gzip but is not gzip data; send the gzip bytes "
                       "as they are, or drop the header")
    data = bytes(body)
    for _ in codings:  # applied in the order listed, so undone in reverse; each is gzip
        data = _gunzip(data)
    return data


def _gunzip(data: bytes) -> bytes:
    """One gzip layer (all its members) decoded, reading no more than ``MAX_DECODED_BODY_BYTES`` out."""
    decoded = bytearray()
    while data:
        decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            decoded += decompressor.decompress(data, MAX_DECODED_BODY_BYTES + 1 - len(decoded))
        except zlib.error:
            raise BadInput("the body is marked Content-Encoding: gzip but is not valid gzip data") from None
        if len(decoded) > MAX_DECODED_BODY_BYTES:
            raise PayloadTooLarge(f"the gzip body decodes to more than {MAX_DECODED_BODY_BYTES} bytes, the limit "
                                  "for a body (max_request_size); send less")
        if not decompressor.eof:
            raise BadInput("the gzip body is truncated; send the complete gzip data")
        data = decompressor.unused_data  # a next gzip member, concatenated (as gzip -c a b writes)
    return bytes(decoded)
