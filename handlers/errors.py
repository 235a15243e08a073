"""Per-request errors and the one table that maps them to HTTP statuses.

Every error a client can see has the JSON body ``{"code": int, "type": str, "message": str}``.
The message says what to send instead; it never echoes the request's content.
"""

from __future__ import annotations

import torch


class RequestError(Exception):
    """An error that belongs to one request of a batch, not to the worker."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadInput(RequestError):
    """The request cannot be understood: wrong format, missing field, bad option."""


class PayloadTooLarge(RequestError):
    """The request is understood but exceeds a configured size limit."""


# One table, most specific first: exception type -> (HTTP status, error type shown to clients).
# MemoryError and torch.OutOfMemoryError come from the forward pass and are reported as 507,
# the status TorchServe itself uses for "out of resources".
ERROR_TABLE: tuple[tuple[type[BaseException], int, str], ...] = (
    (BadInput, 400, "BadInput"),
    (PayloadTooLarge, 413, "PayloadTooLarge"),
    (torch.OutOfMemoryError, 507, "OutOfMemory"),
    (MemoryError, 507, "OutOfMemory"),
)
INTERNAL = (500, "InternalError")


def status_for(error: BaseException) -> tuple[int, str]:
    """The HTTP status and error type for an exception, from ERROR_TABLE."""
    for exc_type, status, kind in ERROR_TABLE:
        if isinstance(error, exc_type):
            return status, kind
    return INTERNAL


def error_body(error: BaseException) -> dict:
    """The JSON body a client gets for ``error``."""
    status, kind = status_for(error)
    if isinstance(error, RequestError):
        message = error.message
    elif status == 507:
        message = "the worker ran out of memory for this batch; retry, or send smaller inputs"
    else:
        # A bug in the handler: the traceback is in the worker log, not in the response.
        message = "internal error in the model handler; the worker log has the details"
    return {"code": status, "type": kind, "message": message}
