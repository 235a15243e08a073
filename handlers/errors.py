"""Per-request errors and the one table that maps an exception to its status, body and log level.

Every error a client sees has the JSON body ``{"code": int, "type": str, "message": str}`` and
the HTTP status ``code``. A ``RequestError``'s message is ours: it says what to send instead and
never echoes the request's content. Anything else is our bug: 500, and the traceback goes to the
worker log, not to the client.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import torch


class RequestError(Exception):
    """An error that belongs to one request of a batch, not to the worker."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadInput(RequestError):
    """The request cannot be understood: wrong format, missing field, bad option."""


class PayloadTooLarge(RequestError):
    """The request is understood but exceeds one of the model's size limits."""


class UnsupportedMediaType(RequestError):
    """The body is sent in an encoding this server does not decode (Content-Encoding)."""


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str  # shown to clients as "type"
    log_level: int
    message: str | None  # for errors that are not RequestErrors (their own message is not for clients)


# One table, most specific first. MemoryError and torch.OutOfMemoryError come from the forward
# pass: 507, the status TorchServe itself uses for "out of resources".
OUT_OF_MEMORY = ErrorKind(507, "OutOfMemory", logging.WARNING,
                          "the worker ran out of memory for this batch; retry, or send smaller inputs")
ERROR_TABLE: tuple[tuple[type[BaseException], ErrorKind], ...] = (
    (BadInput, ErrorKind(400, "BadInput", logging.INFO, None)),
    (PayloadTooLarge, ErrorKind(413, "PayloadTooLarge", logging.INFO, None)),
    (UnsupportedMediaType, ErrorKind(415, "UnsupportedMediaType", logging.INFO, None)),
    (torch.OutOfMemoryError, OUT_OF_MEMORY),  # CUDA's; not a MemoryError subclass
    (MemoryError, OUT_OF_MEMORY),
)
INTERNAL = ErrorKind(500, "InternalError", logging.ERROR,
                     "internal error in the model handler; the worker log has the details")


def kind_of(error: BaseException) -> ErrorKind:
    for exc_type, kind in ERROR_TABLE:
        if isinstance(error, exc_type):
            return kind
    return INTERNAL


def status_for(error: BaseException) -> tuple[int, str]:
    """The HTTP status and error type for an exception."""
    kind = kind_of(error)
    return kind.status, kind.type


def error_body(error: BaseException) -> dict:
    """The JSON body a client gets for ``error``."""
    kind = kind_of(error)
    message = error.message if isinstance(error, RequestError) else kind.message
    return {"code": kind.status, "type": kind.type, "message": message}


@contextlib.contextmanager
def reading_client_bytes(what: str, parser_packages: tuple[str, ...]) -> Iterator[None]:
    """Turn an exception raised inside a third-party parser (Pillow, ...) on the client's bytes
    into a 400: malformed input is the client's to fix, never a 500. An exception raised in our
    own code passes through unchanged (that is a bug, and 500 says so)."""
    try:
        yield
    except (RequestError, MemoryError):
        raise
    except Exception as error:  # noqa: BLE001 - classified by where it was raised
        if not _raised_inside(error, parser_packages):
            raise
        raise BadInput(f"{what} could not be decoded ({type(error).__name__}: it may be corrupt or "
                       "in a form this server does not read); send a complete, standard file") from None


def _raised_inside(error: BaseException, packages: tuple[str, ...]) -> bool:
    """True when the exception passed through a frame of ``packages`` (Pillow's EXIF reader, for
    one, raises ZeroDivisionError from the standard library's fractions module)."""
    traceback = error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_globals.get("__name__", "").split(".")[0] in packages:
            return True
        traceback = traceback.tb_next
    return False
