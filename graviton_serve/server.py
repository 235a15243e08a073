"""Starting, watching and stopping a real TorchServe (Java frontend + Python workers).

One ``TorchServe`` is one server instance with its own run folder (its layout:
graviton_serve.run_folder): the rendered config.properties, logs, key file, metrics and temp files
(TorchServe writes its pid file to Python's temp dir and worker sockets to Java's, so each instance
gets its own TMPDIR and the tests never touch another server). It is stopped by its own PIDs, never
by process name.

Clients call its REST APIs through the HTTP front (graviton_serve.http_front: nginx, which answers
pipelined requests in order and closes HTTP/1.0 connections), at the configured addresses;
TorchServe's own REST listeners are on free loopback ports behind it. gRPC is TorchServe's alone.

Its properties come from graviton_serve.torchserve_config, its management calls go through
graviton_serve.management, draining it is graviton_serve.drain, and holding it in the foreground
until SIGTERM is graviton_serve.foreground.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import astuple
from pathlib import Path

import psutil

from graviton_serve.http_front import APIS, HttpFront, Listener
from graviton_serve.java import find_java_home
from graviton_serve.management import ManagementClient
from graviton_serve.run_folder import MODEL_LOG, TS_LOG, RunFolder
from graviton_serve.stopping import stop_processes
from graviton_serve.torchserve_config import Ports, ServerConfig, free_loopback_ports, write_properties
from handlers.launch import launch_environment


class StartCancelled(RuntimeError):
    """``start`` was told to give up (a container's SIGTERM during start-up); TorchServe is stopped."""


class ServerError(RuntimeError):
    pass


# How long a start waits for every model to be READY, in seconds (the container's GS_READY_TIMEOUT_S
# default): the first start on a machine times auto's precision one worker at a time.
READY_TIMEOUT_S = 600
TORCHSERVE_MAX_REQUEST_SIZE = 6553500  # TorchServe 0.12's default max_request_size, in bytes


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class TorchServe:
    """One TorchServe instance with its own run folder."""

    def __init__(
        self,
        run_dir: Path,
        model_store: Path,
        config_file: Path,
        ports: Ports | None = None,
        host: str | None = None,
        overrides: dict[str, str] | None = None,
    ):
        self.run_dir = Path(run_dir).resolve()
        self.model_store = Path(model_store).resolve()
        config = ServerConfig.render(Path(config_file), self.model_store, ports, host, overrides)
        self.properties = config.properties
        self.ports = config.ports
        self.host = config.host
        self.token_auth = config.token_auth
        self.rest_addresses = config.rest_addresses
        self.run_folder = RunFolder(self.run_dir)  # every path under run_dir
        self.front = HttpFront(self.run_folder)  # nginx before the REST listeners (graviton_serve.http_front)
        self.log_starts: dict[str, int] = {}  # where this start's lines begin in TorchServe's logs

    # -- addresses and credentials ------------------------------------------------------------

    def url(self, api: str, path: str = "") -> str:
        port = {"inference": self.ports.inference, "management": self.ports.management, "metrics": self.ports.metrics}[api]
        return f"http://{self.host}:{port}/{path.lstrip('/')}"

    def token(self, api: str = "inference") -> str:
        """The bearer token for ``inference`` or ``management`` from this instance's key file."""
        keys = json.loads(self.run_folder.key_file.read_text())
        return keys[api]["key"]

    def auth(self, api: str = "inference") -> dict[str, str]:
        """The Authorization header for ``api`` (none when token auth is off)."""
        return {"Authorization": f"Bearer {self.token(api)}"} if self.token_auth else {}

    def management(self, timeout: float = 5.0) -> ManagementClient:
        """A management API client with this instance's token (read at each call: it is made at start)."""
        return ManagementClient(self.url("management"), lambda: self.auth("management"), timeout=timeout)

    # -- life cycle ----------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        try:
            return int(self.run_folder.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def is_running(self) -> bool:
        pid = self.pid
        if pid is None:
            return False
        try:
            process = psutil.Process(pid)
            return process.status() != psutil.STATUS_ZOMBIE and "org.pytorch.serve.ModelServer" in process.cmdline()
        except psutil.Error:
            return False

    def environment(self) -> dict[str, str]:
        env = launch_environment(
            {key: value for key, value in os.environ.items() if key != "PYTHONPATH"},
            core_lock_dir=str(self.run_folder.core_locks),
            busy_dir=str(self.run_folder.busy),
            precision_cache_dir=str(self.run_folder.precision_cache),  # kept across restarts of this run folder
        )
        env.update(
            JAVA_HOME=str(find_java_home()),
            TMPDIR=str(self.run_folder.tmp),
            TEMP=str(self.run_folder.tmp),
            LOG_LOCATION=str(self.run_folder.logs),
            METRICS_LOCATION=str(self.run_folder.logs),
        )
        return env

    def start(self, timeout: float = READY_TIMEOUT_S, foreground: bool = False,
              cancel: threading.Event | None = None) -> subprocess.Popen | None:
        """Start TorchServe and wait until every model in the store has a READY worker.

        With ``foreground`` the launcher process stays attached and is returned (for containers).
        ``cancel`` set while waiting: TorchServe is stopped and StartCancelled raised.
        """
        if self.is_running():
            raise ServerError(f"a TorchServe of this run folder is already running (pid {self.pid}); stop it first")
        for folder in (self.run_dir, self.run_folder.logs, self.run_folder.tmp, self.run_folder.busy):
            folder.mkdir(parents=True, exist_ok=True)
        self.run_folder.pid_file.unlink(missing_ok=True)
        self.run_folder.key_file.unlink(missing_ok=True)
        # TorchServe appends to its logs: what this start wrote begins at these sizes
        self.log_starts = {name: _size(self.run_folder.log(name)) for name in (MODEL_LOG, TS_LOG)}
        listeners = self.front_listeners()
        # TorchServe's REST listeners: loopback ports behind the front; everything else as configured
        write_properties(self.run_folder.config, {
            **self.properties, **{f"{l.api}_address": f"http://127.0.0.1:{l.upstream_port}" for l in listeners}})
        self.front.start(listeners, int(self.properties.get("max_request_size", TORCHSERVE_MAX_REQUEST_SIZE)))
        command = [
            str(Path(sys.executable).with_name("torchserve")), "--start",
            "--ts-config", str(self.run_folder.config),
            "--model-store", str(self.model_store),
        ]
        if foreground:
            command.append("--foreground")
        try:
            with open(self.run_folder.console_log, "ab") as console:
                launcher = subprocess.Popen(
                    command, cwd=self.run_dir, env=self.environment(), stdout=console, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )
            if not foreground:
                launcher.wait(timeout=60)
            self.wait_ready(timeout, cancel)
        except BaseException:
            self.stop()
            raise
        return launcher if foreground else None

    def front_listeners(self) -> list[Listener]:
        """Each REST API's configured address (the front's) and a free loopback port for TorchServe."""
        # Every configured port, the gRPC ones included: none is bound yet, so a port picked free
        # can be one of them (seen: TorchServe's upstream inference port = its gRPC management port).
        configured = {port for _, port in self.rest_addresses.values()} | set(astuple(self.ports))
        upstream = free_loopback_ports(len(APIS), exclude=configured)
        return [Listener(api, *self.rest_addresses[api], inner) for api, inner in zip(APIS, upstream)]

    def expected_models(self) -> list[str]:
        return sorted(path.stem for path in self.model_store.glob("*.mar"))

    def wait_ready(self, timeout: float, cancel: threading.Event | None = None) -> dict[str, str]:
        """Wait until each model of the store has a READY worker; returns name -> status.
        Raises ServerError (TorchServe exited, or the timeout, with the workers' last errors) or
        StartCancelled (``cancel`` was set)."""
        cancel = cancel or threading.Event()
        deadline = time.monotonic() + timeout
        expected = self.expected_models()
        client = self.management()
        status: dict[str, str] = {}
        while time.monotonic() < deadline:
            if self.pid is not None and not self.is_running():
                raise ServerError(f"TorchServe exited during start-up; see {self.run_folder.log(TS_LOG)}\n{self.log_tail()}")
            if self.run_folder.key_file.exists() or not self.token_auth:
                status = {name: client.status(name) for name in expected}
                if all(state == "READY" for state in status.values()):
                    return status
            if cancel.wait(0.5):
                raise StartCancelled(f"start-up cancelled; models then: {status or 'frontend not up'}")
        errors = self.worker_errors()
        raise ServerError(
            f"not every model was READY within {timeout:.0f}s: {status or 'frontend not up'}; see {self.run_folder.logs}\n"
            + (f"the workers' last errors:\n{errors}" if errors else self.log_tail())
        )

    def worker_errors(self, lines: int = 8) -> str:
        """The last lines of this start's logs that report a worker's error: the workers' own
        (a model that fails to load keeps being retried by TorchServe, and its access log buries
        the cause), and the frontend's word on a worker that died or did not answer in time."""
        found = {}
        for name, marks in ((MODEL_LOG, ("Error", "ERROR", "Traceback")),
                            (TS_LOG, ("did not respond", "Load model failed", "Worker died"))):
            found[name] = []
            with contextlib.suppress(OSError):
                with open(self.run_folder.log(name), "rb") as log:
                    log.seek(self.log_starts.get(name, 0))
                    found[name] = [line for line in log.read().decode(errors="replace").splitlines()
                                   if any(mark in line for mark in marks)]
        frontend = list(dict.fromkeys(line.split(" - ", 1)[-1] for line in found[TS_LOG]))[-2:]  # it logs each twice
        return "\n".join(found[MODEL_LOG][-(lines - len(frontend)):] + frontend)

    def processes(self) -> list[psutil.Process]:
        """The frontend and all its descendants (the Python workers), then the HTTP front's."""
        front = self.front.processes()
        if not self.is_running():
            return front
        frontend = psutil.Process(self.pid)
        return [frontend, *frontend.children(recursive=True), *front]

    def stop(self, timeout: float = 60.0) -> None:
        """Stop this instance and wait until its processes have exited: the HTTP front first (no
        new request gets in; answers under way are finished), then TorchServe."""
        self.front.stop()
        stop_processes(self.processes(), signal.SIGTERM, timeout)
        self.run_folder.pid_file.unlink(missing_ok=True)
        self.run_folder.key_file.unlink(missing_ok=True)

    def log_tail(self, lines: int = 20, name: str = TS_LOG) -> str:
        path = self.run_folder.log(name)
        if not path.exists():
            path = self.run_folder.console_log
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
