"""HTTP spoken by hand on a socket, for what no client library does: pipelining (every request
written before any answer is read) and HTTP/1.0."""

from __future__ import annotations

import socket

NOT_CLOSED_WAIT_S = 3.0  # how long a test waits to see that a connection stays open


def read_answer(stream) -> tuple[int, dict[str, str], bytes]:
    """One HTTP answer (Content-Length framed, as TorchServe's are) from a socket's file."""
    status = int(stream.readline().split()[1])
    headers = {}
    while (line := stream.readline().decode("latin-1").strip()):
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, stream.read(int(headers.get("content-length", 0)))


def pipelined(port: int, requests: list[bytes]) -> list[bytes]:
    """Write every request at once on one connection, then read as many answers; their bodies."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        connection.sendall(b"".join(requests))
        stream = connection.makefile("rb")
        return [read_answer(stream)[2] for _ in requests]


def answer_and_whether_closed(port: int, data: bytes) -> tuple[int, dict[str, str], bool]:
    """Send ``data``, read one answer, then wait up to NOT_CLOSED_WAIT_S for the server to close."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        connection.sendall(data)
        stream = connection.makefile("rb")
        status, headers, _ = read_answer(stream)
        connection.settimeout(NOT_CLOSED_WAIT_S)
        try:
            closed = stream.read(1) == b""
        except (TimeoutError, socket.timeout):
            closed = False
        return status, headers, closed
