"""The HTTP front (graviton_serve.http_front) through a real TorchServe: pipelined requests are
answered in the order sent, HTTP/1.0 connections are closed unless kept alive, on every REST port.

Each behaviour is also asserted the other way round on TorchServe's own listener behind the front
(the ``torchserve_itself`` tests): those are the faults the front is there for, measured on this
TorchServe, and they would tell if a TorchServe release fixed them.

Requests are written by hand on a socket (tests/raw_http.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest
import requests as http

from graviton_serve.paths import ROOT
from tests.conftest import ServerUnderTest, slow_archive
from tests.raw_http import NOT_CLOSED_WAIT_S, answer_and_whether_closed, pipelined, read_answer
from tests.realworld_inputs import good_png

pytestmark = pytest.mark.integration

SLOW_TENTHS = 20  # the slow model sleeps 2 s: the fast answers behind it are ready long before


@pytest.fixture(scope="module")
def server(tmp_path_factory, mnist_mar):
    root = tmp_path_factory.mktemp("ts_front")
    work = root / "work"
    work.mkdir()
    under_test = ServerUnderTest(root, [mnist_mar, slow_archive(work, work)])
    yield under_test.start()
    under_test.stop()


def request(server, model: str, body: bytes, version: str = "HTTP/1.1", extra: str = "") -> bytes:
    return (f"POST /predictions/{model} {version}\r\nHost: test\r\nAuthorization: Bearer {server.token()}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def pipelined_mix(server) -> tuple[list[bytes], list[str]]:
    """slow (2 s), mnist, slow (0.1 s), mnist: the requests, and what kind each answer must be."""
    return ([request(server, "slow", str(SLOW_TENTHS).encode()), request(server, "mnist", good_png(28)),
             request(server, "slow", b"1"), request(server, "mnist", good_png(28))],
            ["slow", "mnist", "slow", "mnist"])


def kind_of(body: bytes) -> str:
    answer = json.loads(body)
    return "slow" if "slept_tenths" in answer else "mnist" if "0" in answer or len(answer) == 5 else repr(answer)


def test_pipelined_requests_are_answered_in_the_order_sent(server):
    requests, expected = pipelined_mix(server)
    bodies = pipelined(server.ports.inference, requests)
    assert [kind_of(body) for body in bodies] == expected
    assert json.loads(bodies[0]) == {"slept_tenths": SLOW_TENTHS} and json.loads(bodies[2]) == {"slept_tenths": 1}


def test_torchserve_itself_answers_pipelined_requests_in_the_order_they_finish(server):
    requests, expected = pipelined_mix(server)
    bodies = pipelined(upstream_port(server, "inference"), requests)
    assert [kind_of(body) for body in bodies] != expected  # mnist's answers overtake the slow one


def test_pipelined_management_requests_are_answered_in_order(server):
    auth = f"Authorization: Bearer {server.token('management')}\r\n"
    requests = [f"GET /models/{model} HTTP/1.1\r\nHost: test\r\n{auth}\r\n".encode() for model in ("slow", "mnist") * 3]
    bodies = pipelined(server.ports.management, requests)
    assert [json.loads(body)[0]["modelName"] for body in bodies] == ["slow", "mnist"] * 3


@pytest.mark.parametrize("api", ["inference", "management", "metrics"])
def test_an_http10_request_is_answered_and_its_connection_closed(server, api):
    if api == "inference":
        data = request(server, "mnist", good_png(28), version="HTTP/1.0")
    else:
        path = "/models" if api == "management" else "/metrics"
        data = f"GET {path} HTTP/1.0\r\nAuthorization: Bearer {server.token('management')}\r\n\r\n".encode()
    started = time.monotonic()
    status, headers, closed = answer_and_whether_closed(getattr(server.ports, api), data)
    assert status == 200 and closed, (status, headers, closed)
    assert headers.get("connection", "close").lower() == "close"
    assert time.monotonic() - started < NOT_CLOSED_WAIT_S  # closed at once, not by the wait running out


def test_torchserve_itself_keeps_an_http10_connection_open(server):
    status, headers, closed = answer_and_whether_closed(
        upstream_port(server, "inference"), request(server, "mnist", good_png(28), version="HTTP/1.0"))
    assert status == 200 and not closed and headers.get("connection", "").lower() == "keep-alive"


def test_an_http10_client_that_asks_for_keep_alive_keeps_its_connection(server):
    with socket.create_connection(("127.0.0.1", server.ports.inference), timeout=60) as connection:
        stream = connection.makefile("rb")
        for _ in range(2):
            connection.sendall(request(server, "mnist", good_png(28), "HTTP/1.0", "Connection: keep-alive\r\n"))
            status, headers, body = read_answer(stream)
            assert status == 200 and kind_of(body) == "mnist", (status, body)
            assert headers.get("connection", "").lower() == "keep-alive"


def test_a_chunked_body_is_passed_on(server):
    png = good_png(28)
    reply = http.post(server.url("inference", "predictions/mnist"), data=iter([png[:100], png[100:]]),
                      headers={**server.auth(), "Content-Type": "image/png"}, timeout=60)
    assert reply.request.headers.get("Transfer-Encoding") == "chunked"
    assert reply.status_code == 200 and kind_of(reply.content) == "mnist", reply.text


def test_expect_100_continue_gets_its_100_then_the_answer(server):
    body = good_png(28)
    head = request(server, "mnist", b"", extra="Expect: 100-continue\r\n").replace(b"Content-Length: 0",
                                                                                  f"Content-Length: {len(body)}".encode())
    with socket.create_connection(("127.0.0.1", server.ports.inference), timeout=60) as connection:
        connection.sendall(head)
        stream = connection.makefile("rb")
        assert stream.readline().split()[1] == b"100"
        assert stream.readline() == b"\r\n"
        connection.sendall(body)
        status, _, answer = read_answer(stream)
    assert status == 200 and kind_of(answer) == "mnist"


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_max_request_size_is_a_json_413(server, chunked):
    limit = int(server.properties["max_request_size"])
    body = b"\0" * (limit + 1)
    reply = http.post(server.url("inference", "predictions/mnist"), data=iter([body]) if chunked else body,
                      headers={**server.auth(), "Content-Type": "image/png"}, timeout=60)
    assert reply.status_code == 413 and reply.headers["Content-Type"] == "application/json"
    assert reply.json() == {"code": 413, "type": "PayloadTooLarge", "message":
                            f"the body is over the limit of {limit} bytes of this server (max_request_size); send less"}


BAD_HTTP = {  # requests nginx refuses itself; before, each got nginx's HTML page
    "length and chunked": (b"POST /predictions/mnist HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "BadRequest"),
    "two lengths": (b"POST /predictions/mnist HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                    b"Content-Length: 5\r\n\r\nabcde", 400, "BadRequest"),
    "header too large": (b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
                         431, "RequestHeaderFieldsTooLarge"),
    "request line too long": (b"GET /ping?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "URITooLong"),
}


@pytest.mark.parametrize("name", sorted(BAD_HTTP))
def test_what_the_front_refuses_itself_is_answered_in_the_error_contract_s_json(server, name):
    data, status, kind = BAD_HTTP[name]
    with socket.create_connection(("127.0.0.1", server.ports.inference), timeout=60) as connection:
        connection.sendall(data)
        got, headers, body = read_answer(connection.makefile("rb"))
    assert got == status and headers["content-type"] == "application/json", (got, headers, body[:200])
    answer = json.loads(body)
    assert answer["code"] == status and answer["type"] == kind and answer["message"]


def test_when_torchserve_does_not_answer_the_front_says_so_in_json(tmp_path):
    from graviton_serve.http_front import HttpFront, Listener
    from graviton_serve.run_folder import RunFolder
    from graviton_serve.torchserve_config import free_loopback_ports

    port, nobody = free_loopback_ports(2)
    front = HttpFront(RunFolder(tmp_path))
    front.start([Listener("inference", "127.0.0.1", port, nobody)], 1024)
    try:
        reply = http.get(f"http://127.0.0.1:{port}/ping", timeout=30)
    finally:
        front.stop()
    assert reply.status_code == 502 and reply.json()["type"] == "BadGateway"


def test_torchserve_itself_answers_an_oversized_body_with_an_empty_413(server):
    limit = int(server.properties["max_request_size"])
    reply = http.post(f"http://127.0.0.1:{upstream_port(server, 'inference')}/predictions/mnist",
                      data=b"\0" * (limit + 1), headers={**server.auth(), "Content-Type": "image/png"}, timeout=60)
    assert reply.status_code == 413 and reply.content == b""


def test_torchserve_s_own_listeners_are_loopback_only(server):
    for listener in server.front.listeners:
        assert listener.upstream_port not in (server.ports.inference, server.ports.management, server.ports.metrics)
        written = f"{listener.api}_address=http://127.0.0.1:{listener.upstream_port}"
        assert written in server.run_folder.config.read_text().splitlines()


def upstream_port(server, api: str) -> int:
    return next(listener.upstream_port for listener in server.front.listeners if listener.api == api)


def test_a_stop_from_another_process_stops_the_front_too(server):
    # Last in this module: it stops the module's server. scripts/serve --stop is such a process: a
    # new TorchServe object for the same run folder, which finds nginx through its pid file.
    front = server.front.processes()
    assert front and all(process.name() == "nginx" for process in front)
    stop = ("from graviton_serve.server import TorchServe; from graviton_serve.paths import CONFIG_FILE; "
            f"TorchServe({str(server.run_dir)!r}, {str(server.model_store)!r}, CONFIG_FILE).stop()")
    subprocess.run([sys.executable, "-c", stop], check=True, cwd=ROOT, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert not [process.pid for process in front if process.is_running() and process.status() != psutil.STATUS_ZOMBIE]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.ports.inference), timeout=2).close()


def test_torchserves_upstream_ports_avoid_every_configured_port_the_grpc_ones_included(tmp_path, monkeypatch):
    """None of the configured ports is bound when TorchServe's REST listeners behind the front are
    picked, so a free pick could equal one: a container test's TorchServe once got its gRPC
    management port as its upstream inference port and exited with 'Address already in use'."""
    import graviton_serve.server as server_module
    from graviton_serve.server import TorchServe
    from graviton_serve.torchserve_config import Ports, free_loopback_ports

    ports = Ports(*free_loopback_ports(5))
    server = TorchServe(tmp_path / "run", tmp_path, ROOT / "config.properties", ports=ports)
    excluded = []
    monkeypatch.setattr(server_module, "free_loopback_ports",
                        lambda count, exclude: excluded.append(set(exclude)) or free_loopback_ports(count, exclude))
    listeners = server.front_listeners()
    assert excluded == [set(ports.__dict__.values())]
    assert not {listener.upstream_port for listener in listeners} & set(ports.__dict__.values())
