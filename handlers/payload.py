"""What one request sent, taken out of TorchServe's request dict: the input contract.

TorchServe 0.12 (``ts/protocol/otf_message_handler.py``) hands the handler one dict per request,
one key per input part, each value already decoded by the part's content type:

| content type              | value the handler gets                                          |
|---------------------------|-----------------------------------------------------------------|
| exactly application/json  | the parsed JSON: dict, list, str, int, float, bool or None;     |
|                           | bytes when the JSON is invalid                                  |
| text/*                    | str when the bytes are UTF-8, else bytes                        |
| anything else             | bytes (also application/json; charset=..., which we parse)     |

The raw body is the part "body" (REST) or "data" (gRPC's input map, KServe); a multipart upload
gives one key per part name; a form (application/x-www-form-urlencoded) is split into its
fields, so the raw body is gone. URL query parameters are not passed on at all: per-request
options travel in a JSON body or as form fields. A gzip body is decoded per request (``content``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from handlers.content_encoding import decode_content
from handlers.errors import BadInput, PayloadTooLarge

BODY_KEYS = ("body", "data")
# Multipart part names that carry the content when neither "body" nor "data" is sent.
CONTENT_PART_NAMES = ("image", "file", "text", "inputs")
FORM_TYPE = "application/x-www-form-urlencoded"
SENT_AS_FORM = (
    f"the body was sent as a form ({FORM_TYPE}, the default of curl -d and urllib), so TorchServe split it "
    "into form fields and the raw body never reached the model; send it with curl --data-binary @FILE "
    "-H 'Content-Type: text/plain' (or application/octet-stream for binary files), or curl -T FILE"
)

T = TypeVar("T")


@dataclass(frozen=True)
class Payload:
    """One request: its content, the content's type, and the other parts sent beside it."""

    body: Any  # bytes | str | dict | list | int | float | bool | None (None: nothing was sent)
    content_type: str = ""  # the content part's own type, lower case
    fields: dict[str, Any] = field(default_factory=dict)
    sent_as_form: bool = False  # the HTTP request was x-www-form-urlencoded
    unnamed_parts: int = 0  # parts sent, none of them under a content name (multipart, gRPC)
    content_encoding: str = ""  # the HTTP Content-Encoding header, lower case ("" when none)

    @classmethod
    def from_request(cls, request: dict, headers: dict | None = None) -> "Payload":
        """``request`` is TorchServe's dict for one request; ``headers`` its request headers:
        HTTP headers (str values) and, per part, ``{"content-type": ...}``."""
        headers = headers or {}
        http_type = _http_header(headers, "content-type")
        sent_as_form = http_type.lower().startswith(FORM_TYPE)
        body_key = next((k for k in BODY_KEYS + CONTENT_PART_NAMES if k in request), None)
        if body_key is None and len(request) == 1 and not sent_as_form:
            body_key = next(iter(request))  # a single multipart part under any name is the content
        fields = {k: v for k, v in request.items() if k != body_key}
        part_headers = headers.get(body_key) if body_key else None
        content_type = str(part_headers.get("content-type", "") or "") if isinstance(part_headers, dict) else ""
        unnamed = 0 if body_key or sent_as_form else len(request)
        return cls(request.get(body_key) if body_key else None, content_type.lower(), fields, sent_as_form, unnamed,
                   _http_header(headers, "content-encoding").lower())

    @functools.cached_property
    def content(self) -> Any:
        """The body with its Content-Encoding undone (``handlers.content_encoding``)."""
        return decode_content(self.body, self.content_encoding)

    def json_body(self) -> Any:
        """The body as a JSON value, parsed by TorchServe or here (bytes sent as JSON); None when
        the body was not sent as JSON. Invalid JSON is the client's error to hear about."""
        return self._json

    @functools.cached_property
    def _json(self) -> Any:
        # Parsed once: decode asks for it for the content and again for each option.
        content = self.content
        if not isinstance(content, (bytes, bytearray, str)):
            return content  # TorchServe parsed it: dict, list, number, bool (or None: no JSON)
        if isinstance(content, (bytes, bytearray)) and self.content_type.startswith("application/json"):
            try:
                return json.loads(content)
            except RecursionError:
                raise BadInput("the JSON body is nested too deeply to read; send one flat JSON object") from None
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
        body = self.json_body()
        raw = body.get(name) if isinstance(body, dict) else self.fields.get(name)
        if raw is None:
            return default
        if isinstance(raw, (bytes, bytearray)):
            raw = raw.decode("utf-8", errors="replace")
        try:
            return parse(raw)
        except (ValueError, TypeError) as exc:
            raise BadInput(f"option '{name}' is invalid: {exc}") from None

    def text(self, json_keys: tuple[str, ...], max_bytes: int) -> str:
        """The request's text: a raw body (UTF-8), a JSON string, or a JSON object's first field
        of ``json_keys``. Lone UTF-16 surrogates (an emoji cut in half) become U+FFFD."""
        keys = " or ".join(f'"{key}"' for key in json_keys)
        if isinstance(self.content, (bytes, bytearray)) and self.json_body() is None:
            try:
                text = bytes(self.content).decode("utf-8")
            except UnicodeDecodeError as error:
                raise BadInput(f"the body is not valid UTF-8 (byte {error.start}); send UTF-8 text") from None
        else:
            document = self.content if isinstance(self.content, str) else self.json_body()
            if isinstance(document, dict):
                key = next((k for k in json_keys if k in document), None)
                if key is None:
                    raise BadInput(f"the JSON body has no {keys} field; send {{\"{json_keys[0]}\": \"...\"}} or the raw text")
                document = document[key]
                if isinstance(document, list):
                    raise BadInput(f'"{key}" holds a list: send one text per request (or a batch through the KServe envelope)')
                if not isinstance(document, str):
                    raise BadInput(f'"{key}" must be a string')
            if document != "":  # an empty string is an empty text, said below
                self._refuse_non_content(document, "text", f'send the text as the body, or as JSON {{"{json_keys[0]}": "..."}}')
            text = _without_lone_surrogates(document)
        if len(text.encode("utf-8")) > max_bytes:
            raise PayloadTooLarge(f"the text is over this model's limit of {max_bytes} bytes (max_text_bytes); send less")
        if not any(map(_visible, text)):
            raise BadInput("the text is empty: it has no visible characters (only whitespace, or invisible ones "
                           "such as zero-width spaces, BOMs or direction marks); send some text")
        return text

    def binary(self, json_key: str) -> bytes:
        """The request's binary content: raw bytes, base64 text, or base64 (or a data URL) under
        ``json_key`` of a JSON object."""
        document = self.json_body()
        if isinstance(document, dict):
            if json_key not in document:
                raise BadInput(f"the JSON body has no '{json_key}' field; send {{\"{json_key}\": \"<base64>\"}} "
                               "or the raw bytes as the body")
            return decode_base64(document[json_key], what=f"'{json_key}'")
        content = self.content if document is None else document
        self._refuse_non_content(content, json_key, f"send the raw bytes, base64 text or {{\"{json_key}\": \"<base64>\"}}")
        if isinstance(content, str) or bytes(content[:5]) == b"data:":
            return decode_base64(content if isinstance(content, str) else bytes(content).decode("ascii", "replace"),
                                 what="the text body")
        maybe_text = _base64_text(bytes(content))
        return maybe_text if maybe_text is not None else bytes(content)

    def _refuse_non_content(self, value: Any, what: str, how: str) -> None:
        """A 400 that says why ``value`` is no usable content (a str or bytes that is not empty)."""
        if value is None and self.sent_as_form:
            raise BadInput(SENT_AS_FORM)
        if value is None and self.unnamed_parts:
            names = ", ".join(BODY_KEYS + CONTENT_PART_NAMES)
            raise BadInput(f"the request has {self.unnamed_parts} parts and none is named {names}: name the content's "
                           f"part one of these (options such as top_k go in parts of their own)")
        if value is None and self.content_type.startswith("application/json"):
            raise BadInput(f"the JSON body is null, not {_a(what)}; {how}")
        if value is None or (isinstance(value, (str, bytes, bytearray)) and len(value) == 0):
            raise BadInput(f"the request body is empty; {how}")
        if isinstance(value, list):
            raise BadInput(f"the JSON body is a list: send one {what} per request (or a batch through the KServe envelope)")
        if not isinstance(value, (str, bytes, bytearray)):
            json_type = {bool: "boolean", int: "number", float: "number", dict: "object"}.get(type(value), type(value).__name__)
            raise BadInput(f"the JSON body is a {json_type}, not {_a(what)}; {how}")


def _http_header(headers: dict, name: str) -> str:
    """An HTTP header's value ("" when absent); per-part entries (dicts) are not HTTP headers."""
    return next((v for k, v in headers.items() if k.lower() == name and isinstance(v, str)), "")


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


def _without_lone_surrogates(text: str) -> str:
    """JSON may carry an unpaired UTF-16 surrogate (``"\\ud83d"``): no UTF-8 can hold it, so it
    becomes U+FFFD, as a UTF-8 decoder treats a broken sequence."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# Letters and symbols that draw nothing: Hangul fillers and the braille blank (what invisible text
# is made of besides the categories below).
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def _visible(char: str) -> bool:
    """False for whitespace, controls, format characters (zero-width spaces and joiners, BOMs,
    direction marks, soft hyphens), combining marks and variation selectors, and blank letters."""
    return not char.isspace() and unicodedata.category(char) not in ("Cc", "Cf", "Mn", "Me") \
        and char not in _BLANK_LETTERS


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _short(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0][:120]
