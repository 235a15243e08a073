"""The HTTP front: nginx in front of TorchServe's three REST listeners (inference, management, metrics).

Why: TorchServe 0.12's Netty frontend writes each answer when its inference finishes, so requests
pipelined on one keep-alive connection come back in the order they finish, not the order sent
(RFC 9112 section 9.3.2 requires the order sent: a pipelining client pairs answers by order and
hands each request another's answer); and it answers an HTTP/1.0 request without ``Connection:
keep-alive`` as keep-alive and leaves the connection open (ApacheBench without -k hangs). nginx
reads one request at a time per client connection and closes HTTP/1.0 connections unless asked
to keep them, and it is Debian's, in C, and well kept. TorchServe's REST listeners move to free
loopback ports that only nginx calls; clients call the configured addresses, now nginx's.

What nginx must not change, and how it does not: the token (headers pass as sent), answers
streamed in chunks (no response buffering), gRPC (not proxied at all: its ports stay TorchServe's),
TorchServe's response timeout (nginx waits longer), and the drain (stopped after TorchServe drained).
What it adds: a body is read whole before TorchServe sees it (a slow upload holds an nginx
connection, not a Netty one), so ``max_request_size`` is enforced here, with the error contract's
JSON 413 instead of TorchServe's empty one; bodies over ``BODY_IN_MEMORY`` wait in the run folder.

nginx is the system's (``nginx`` on PATH or /usr/sbin/nginx: the container installs Debian's
nginx) or, on a machine without it, the binary of Debian's nginx fetched once into the
cache (graviton_serve.debian.fetch_from_deb: nothing installed, no service started).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from graviton_serve import debian
from graviton_serve.paths import CACHE_DIR
from graviton_serve.run_folder import RunFolder
from graviton_serve.stopping import stop_processes

NGINX_PACKAGE = ("nginx", debian.SUITE)
NGINX_BINARY = CACHE_DIR / "nginx" / "nginx"  # present only once a fetch has completed
START_TIMEOUT_S = 10
# nginx waits this long for TorchServe's answer; TorchServe's own responseTimeout (120 s default)
# ends a slow inference first, with its own error.
UPSTREAM_TIMEOUT_S = 3600
APIS = ("inference", "management", "metrics")
BODY_IN_MEMORY = "1m"  # nginx's client_body_buffer_size: smaller bodies never touch the disk


class FrontError(RuntimeError):
    pass


def nginx_binary() -> Path:
    """The system's nginx, else Debian's nginx binary fetched once into the cache."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if found:
        return Path(found)
    package, suite = NGINX_PACKAGE
    try:
        return debian.fetch_from_deb(package, suite, "usr/sbin/nginx", NGINX_BINARY, "~600 KB")
    except debian.DebianError as error:
        raise FrontError(f"nginx is needed in front of TorchServe's REST ports and could not be fetched ({error}); "
                         "install it (Debian/Ubuntu: apt-get install nginx) and run again") from None


@dataclass(frozen=True)
class Listener:
    """One REST API: where clients call it (``host``, ``port``) and where TorchServe listens for it."""

    api: str
    host: str  # as written in the config, e.g. 127.0.0.1, 0.0.0.0, [::]
    port: int
    upstream_port: int  # TorchServe's own listener, on 127.0.0.1


def _front_errors(max_body_bytes: int) -> dict[int, tuple[int, str]]:
    """What nginx answers itself (the request never reached TorchServe), in the error contract's
    JSON instead of nginx's HTML: nginx's code -> (status sent, body). 494 is nginx's own code for
    headers over its buffers, sent as 431."""
    said = {
        400: (400, "BadRequest", "the request is not valid HTTP/1.1 (its request line, headers or body framing); "
                                 "nothing of it reached the model"),
        408: (408, "RequestTimeout", "the headers or body of the request did not arrive in time"),
        413: (413, "PayloadTooLarge", f"the body is over the limit of {max_body_bytes} bytes of this server "
                                      "(max_request_size); send less"),
        414: (414, "URITooLong", "the request line is too long; send options in the body"),
        494: (431, "RequestHeaderFieldsTooLarge", "a request header, or all of them, is too large"),
        502: (502, "BadGateway", "TorchServe, behind the HTTP front of this server, did not answer; see its logs"),
        504: (504, "GatewayTimeout", "TorchServe, behind the HTTP front of this server, did not answer in time"),
    }
    bodies = {}
    for code, (status, kind, message) in said.items():
        body = json.dumps({"code": status, "type": kind, "message": message})
        assert "'" not in body and "$" not in body  # written inside an nginx single-quoted string
        bodies[code] = (status, body)
    return bodies


def render_config(listeners: list[Listener], run_folder: RunFolder, max_body_bytes: int) -> str:
    """nginx.conf for ``listeners``, refusing bodies over ``max_body_bytes`` (TorchServe's
    max_request_size); every path it writes is under the run folder (a read-only root filesystem
    in the container has nothing else writable)."""
    # A URI, not a named location: a request whose line nginx could not read has no URI to keep.
    errors = "\n".join(f"""        error_page {code} = /graviton-serve-front-error/{code};
        location = /graviton-serve-front-error/{code} {{
            internal;
            default_type application/json;
            return {status} '{body}';
        }}""" for code, (status, body) in _front_errors(max_body_bytes).items())
    front = run_folder.front
    temp = "\n".join(f"    {kind}_temp_path {front / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    servers = "\n".join(f"""
    upstream torchserve_{l.api} {{
        server 127.0.0.1:{l.upstream_port};
        keepalive 32;
    }}
    server {{
        listen {l.host}:{l.port};
        location / {{
            proxy_pass http://torchserve_{l.api};
        }}
{errors}
    }}""" for l in listeners)
    # nginx started by root drops its workers to "nobody", who may not reach the run folder (a root
    # 0700 temp folder): its workers run as the user who runs TorchServe, as the container's do.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};" if os.geteuid() == 0 else ""
    return f"""# Written by graviton_serve.http_front for this run; see that module for why each line is here.
{user}
worker_processes 1;
pid {front / "nginx.pid"};
error_log {run_folder.log("nginx_error.log")} warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;  # TorchServe's access log records every request
    server_tokens off;
{temp}
    client_max_body_size {max_body_bytes};
    client_body_buffer_size {BODY_IN_MEMORY};
    proxy_buffering off;  # streamed answers pass chunk by chunk
    proxy_http_version 1.1;
    proxy_set_header Connection "";  # keep-alive to TorchServe, whatever the client asked
    proxy_set_header Host $http_host;
    proxy_read_timeout {UPSTREAM_TIMEOUT_S}s;
    proxy_send_timeout {UPSTREAM_TIMEOUT_S}s;
    keepalive_requests 100000;
{servers}
}}
"""


class HttpFront:
    """nginx for one run folder: started by ``start``; found again by any process through the pid
    file nginx writes there (``scripts/serve --stop`` runs in a process of its own), and stopped
    by that PID, never by name."""

    def __init__(self, run_folder: RunFolder):
        self.run_folder = run_folder
        self.listeners: list[Listener] = []  # as last started by this object
        self.process: subprocess.Popen | None = None  # when started by this process (reaped on stop)

    @property
    def conf(self) -> Path:
        return self.run_folder.front / "nginx.conf"

    @property
    def pid_file(self) -> Path:
        return self.run_folder.front / "nginx.pid"

    def start(self, listeners: list[Listener], max_body_bytes: int) -> None:
        """Start nginx for ``listeners`` (a front this run folder still has is stopped first) and
        wait until each accepts connections; FrontError, with nginx's own words, when it exits or
        does not listen within START_TIMEOUT_S."""
        self.stop()
        self.listeners = listeners
        self.run_folder.front.mkdir(parents=True, exist_ok=True)
        self.run_folder.logs.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(render_config(listeners, self.run_folder, max_body_bytes))
        error_log = self.run_folder.log("nginx_error.log")
        command = [str(nginx_binary()), "-p", str(self.run_folder.front), "-e", str(error_log), "-c", str(self.conf),
                   "-g", "daemon off;"]
        with open(self.run_folder.console_log, "ab") as console:
            self.process = subprocess.Popen(command, stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        waiting = list(listeners)
        while waiting:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                said = error_log.read_text(errors="replace").strip().splitlines()[-3:] if error_log.exists() else []
                raise FrontError("nginx (the HTTP front) did not start: " + (" | ".join(said) or "no word in its log"))
            waiting = [listener for listener in waiting if not _accepts(listener)]
            time.sleep(0.05)

    def processes(self) -> list[psutil.Process]:
        """nginx's master and workers: the master is the PID in the pid file (or the process this
        object started) when it runs our config file."""
        pids = [self.process.pid] if self.process is not None and self.process.poll() is None else []
        try:
            pids.append(int(self.pid_file.read_text().strip()))
        except (OSError, ValueError):
            pass
        for pid in dict.fromkeys(pids):
            try:
                master = psutil.Process(pid)
                if str(self.conf) in master.cmdline() and master.status() != psutil.STATUS_ZOMBIE:
                    return [master, *master.children(recursive=True)]
            except psutil.Error:
                continue
        return []

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful quit (SIGQUIT: connections finish their current answer), then kill."""
        stop_processes(self.processes(), signal.SIGQUIT, timeout)
        if self.process is not None:
            self.process.wait(timeout=5)
            self.process = None
        self.pid_file.unlink(missing_ok=True)


def _accepts(listener: Listener) -> bool:
    host = listener.host.strip("[]")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        with socket.create_connection((host, listener.port), timeout=0.5):
            return True
    except OSError:
        return False
