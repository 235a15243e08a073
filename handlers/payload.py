"""What one request sent, taken out of TorchServe's request dict.

TorchServe hands the handler one dict per request. The body arrives under "body" or "data"
(bytes, or already decoded: str for text/*, a dict/list for valid application/json; invalid
JSON stays bytes). Multipart form fields arrive as separate keys. URL query parameters are
not passed on at all, so per-request options travel in a JSON body or as form fields.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from handlers.errors import BadInput

BODY_KEYS = ("body", "data")
# Multipart part names that carry the content when neither "body" nor "data" is sent.
CONTENT_PART_NAMES = ("image", "file", "text", "inputs")

T = TypeVar("T")


@dataclass(frozen=True)
class Payload:
    """One request: its body and the form fields sent beside it."""

    body: Any  # bytes | str | dict | list | None
    content_type: str = ""
    fields: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_request(cls, request: dict, headers: dict | None = None) -> "Payload":
        headers = headers or {}
        body_key = next((k for k in BODY_KEYS + CONTENT_PART_NAMES if k in request), None)
        if body_key is None and len(request) == 1:
            body_key = next(iter(request))  # a single multipart part under any name is the content
        fields = {k: v for k, v in request.items() if k != body_key}
        body = request.get(body_key) if body_key else None
        content_type = ""
        part_headers = headers.get(body_key) if body_key else None
        if isinstance(part_headers, dict):
            content_type = str(part_headers.get("content-type", "") or "")
        return cls(body=body, content_type=content_type.lower(), fields=fields)

    def json_body(self) -> Any:
        """The body as parsed JSON when it was sent as JSON, else None.

        TorchServe parses valid JSON for us; JSON that failed to parse arrives as bytes with
        an application/json content type, and that is the client's error to hear about.
        """
        if isinstance(self.body, (dict, list)):
            return self.body
        if self.content_type.startswith("application/json"):
            try:
                return json.loads(self.body)
            except (ValueError, TypeError, UnicodeDecodeError) as exc:
                raise BadInput(
                    f"the body is sent as application/json but is not valid JSON ({_short(exc)}); "
                    "send valid JSON, or the raw bytes with another content type"
                ) from None
        return None

    def option(self, name: str, parse: Callable[[Any], T], default: T) -> T:
        """A per-request option from the JSON body or a form field, parsed and validated.

        ``parse`` raises ValueError/TypeError with a reason; that becomes a 400 naming the option.
        """
        raw: Any = None
        body = self.json_body()
        if isinstance(body, dict) and name in body:
            raw = body[name]
        elif name in self.fields:
            raw = self.fields[name]
        if raw is None:
            return default
        if isinstance(raw, (bytes, bytearray)):
            raw = raw.decode("utf-8", errors="replace")
        try:
            return parse(raw)
        except (ValueError, TypeError) as exc:
            raise BadInput(f"option '{name}' is invalid: {exc}") from None

    def binary(self, json_key: str) -> bytes:
        """The request's binary content: raw bytes, base64 text, or base64 under ``json_key``."""
        document = self.json_body()
        if isinstance(document, dict):
            if json_key not in document:
                raise BadInput(
                    f"the JSON body has no '{json_key}' field; send {{\"{json_key}\": \"<base64>\"}} "
                    "or the raw bytes as the body"
                )
            return decode_base64(document[json_key], what=f"'{json_key}'")
        body = self.body
        if body is not None and not isinstance(body, (bytes, bytearray, str)):
            raise BadInput(f"expected raw bytes, base64 text or a JSON object with '{json_key}'")
        if body is None or len(body) == 0:
            raise BadInput("the request body is empty; send the raw bytes or base64 text")
        if isinstance(body, str):
            return decode_base64(body, what="the text body")
        maybe_text = _base64_text(bytes(body))
        return maybe_text if maybe_text is not None else bytes(body)


_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_\r\n ")


def _base64_text(data: bytes) -> bytes | None:
    """Decoded bytes if ``data`` is base64 text, else None (it is raw binary)."""
    # Binary formats (PNG, JPEG, GIF, ...) start with bytes outside the base64 alphabet.
    if not data or not set(data[:4096]) <= _B64_ALPHABET:
        return None
    try:
        return _b64decode(data)
    except (binascii.Error, ValueError):
        return None


def decode_base64(value: Any, what: str) -> bytes:
    if not isinstance(value, (str, bytes)):
        raise BadInput(f"{what} must be a base64 string")
    if isinstance(value, str) and value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]  # data URL: data:image/png;base64,....
    try:
        decoded = _b64decode(value.encode("ascii") if isinstance(value, str) else value)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise BadInput(f"{what} is not valid base64") from None
    if not decoded:
        raise BadInput(f"{what} is empty")
    return decoded


def _b64decode(data: bytes) -> bytes:
    data = b"".join(data.split())
    if b"-" in data or b"_" in data:
        return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))
    return base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)


def _short(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0][:120]


def positive_int(maximum: int) -> Callable[[Any], int]:
    """A parser for integer options in 1..maximum (bools are rejected)."""

    def parse(raw: Any) -> int:
        if isinstance(raw, bool) or isinstance(raw, float):
            raise ValueError(f"expected an integer from 1 to {maximum}")
        value = int(str(raw).strip())
        if not 1 <= value <= maximum:
            raise ValueError(f"expected an integer from 1 to {maximum}, got {value}")
        return value

    return parse


def one_of(*choices: str) -> Callable[[Any], str]:
    """A parser for options that take one of a few names."""

    def parse(raw: Any) -> str:
        if raw not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {raw!r}")
        return str(raw)

    return parse
