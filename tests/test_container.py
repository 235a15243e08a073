"""The container's main, run exactly as the image runs it (``python -m graviton_serve.container``)
against a real TorchServe: foreground start, SIGTERM with requests in flight (all answered),
exit status, the token switch, and settings errors that name their variable."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

from graviton_serve import container as container_main
from graviton_serve.drain import DRAIN_TIMEOUT_S
from graviton_serve.paths import ROOT
from graviton_serve.run_folder import MODEL_LOG, TS_LOG
from graviton_serve.server import READY_TIMEOUT_S, TorchServe
from graviton_serve.torchserve_config import Ports
from tests.conftest import TESTS, slow_archive

CONTAINER_CONFIG = ROOT / "docker" / "config.properties"


def loopback_config(path: Path, ports: Ports) -> Path:
    """The container config with loopback listeners on free ports (a test runs outside a container)."""
    text = CONTAINER_CONFIG.read_text().replace("0.0.0.0", "127.0.0.1")
    for key, port in (("8080", ports.inference), ("8081", ports.management), ("8082", ports.metrics),
                      ("7070", ports.grpc_inference), ("7071", ports.grpc_management)):
        text = re.sub(rf"(?<=[:=]){key}\b", str(port), text)
    path.write_text(text)
    return path


class Container:
    """The container's main as a process, with the environment the image gives it."""

    def __init__(self, root: Path, store: Path, **env: str):
        root.mkdir(parents=True, exist_ok=True)
        self.ports = Ports.free()
        self.env = {**os.environ, "GS_MODEL_STORE": str(store), "GS_RUN_DIR": str(root / "run"),
                    "GS_CONFIG": str(loopback_config(root / "config.properties", self.ports)), **env}
        self.env.pop("PYTHONPATH", None)
        self.log = root / "container.log"
        self.process = subprocess.Popen([sys.executable, "-m", "graviton_serve.container"], cwd=ROOT, env=self.env,
                                        stdout=open(self.log, "wb"), stderr=subprocess.STDOUT)
        self.server = TorchServe(root / "run", store, Path(self.env["GS_CONFIG"]))

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "every model READY" in self.log.read_text():
                return
            assert self.process.poll() is None, self.log.read_text()
            time.sleep(0.3)
        raise AssertionError(f"not ready in {timeout}s:\n{self.log.read_text()}")

    def probe(self, which: str = "--ready") -> int:
        return subprocess.run([sys.executable, "-m", "graviton_serve.container", which], cwd=ROOT, env=self.env,
                              capture_output=True).returncode

    def close(self) -> None:
        """Whatever a failed test left: the container's main, then TorchServe by its own PIDs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.server.stop()

    def all_pids(self) -> list[int]:
        return [process.pid for process in self.server.processes()]

    def post(self, body: bytes, token: bool = True) -> requests.Response:
        headers = self.server.auth() if token else {}
        return requests.post(self.server.url("inference", "predictions/slow"), data=body, headers=headers, timeout=60)


@pytest.fixture
def containers():
    """Start containers through this; each is closed at teardown, passed or failed."""
    started: list[Container] = []

    def start(*args, **env) -> Container:
        started.append(Container(*args, **env))
        return started[-1]

    yield start
    for container in started:
        container.close()


@pytest.fixture
def store(tmp_path) -> Path:
    folder = tmp_path / "store"
    slow_archive(folder, tmp_path)
    return folder


def gone(pids: list[int]) -> bool:
    return not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


@pytest.mark.integration
def test_sigterm_drains_in_flight_requests_then_exits_with_torchserve_status(tmp_path, store, containers):
    container = containers(tmp_path, store)
    container.wait_ready()
    assert container.probe() == 0
    pids = container.all_pids()
    with ThreadPoolExecutor(4) as pool:
        # Four requests of 1.5 s each, one at a time in the worker: about 6 s of work in flight.
        replies = [pool.submit(container.post, b"15") for _ in range(4)]
        time.sleep(1.0)
        container.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert container.probe() == 1  # draining: a load balancer stops sending here
        answered = [reply.result() for reply in replies]
    assert [reply.status_code for reply in answered] == [200] * 4
    assert all(reply.json() == {"slept_tenths": 15} for reply in answered)
    assert container.process.wait(timeout=90) == 0
    log = container.log.read_text()
    assert "drained: every request answered" in log
    assert gone(pids), "TorchServe processes left after the container's main exited"


@pytest.mark.integration
def test_token_auth_is_on_unless_switched_off_and_a_dead_torchserve_fails_the_container(tmp_path, store, containers):
    container = containers(tmp_path / "auth_on", store)
    container.wait_ready()
    try:
        anonymous = container.post(b"1", token=False)  # TorchServe 0.12 answers 400 here, not 401
        assert anonymous.status_code == 400 and "Token Authorization failed" in anonymous.text
        assert container.post(b"1").status_code == 200
        # /ping wants the token too, so the liveness probe is a command that reads the key file.
        assert requests.get(container.server.url("inference", "ping"), timeout=10).status_code == 400
        assert container.probe("--live") == 0
    finally:
        container.process.send_signal(signal.SIGTERM)
        assert container.process.wait(timeout=90) == 0

    open_container = containers(tmp_path / "auth_off", store, TS_DISABLE_TOKEN_AUTH="true")
    open_container.wait_ready()
    assert open_container.post(b"1", token=False).status_code == 200
    assert open_container.probe("--live") == 0
    # TorchServe dies under it: the container must not report success.
    pids = open_container.all_pids()
    os.kill(open_container.server.pid, signal.SIGKILL)
    assert open_container.process.wait(timeout=90) != 0
    assert "TorchServe exited on its own" in open_container.log.read_text()
    assert open_container.probe("--live") == 1
    deadline = time.monotonic() + 30  # its workers notice their frontend is gone and exit
    while not gone(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert gone(pids)


@pytest.mark.integration
def test_sigterm_during_start_up_stops_at_once_and_a_model_that_never_loads_is_named(tmp_path, store, containers):
    (store / "broken.mar").write_bytes(os.urandom(1000))  # TorchServe retries such a model for ever
    container = containers(tmp_path / "cancelled", store)
    deadline = time.monotonic() + 60
    while "starting TorchServe" not in container.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.3)
    time.sleep(3)
    pids = container.all_pids()
    container.process.send_signal(signal.SIGTERM)
    assert container.process.wait(timeout=60) == 0
    assert "signal received during start-up: TorchServe stopped" in container.log.read_text()
    assert gone(pids)

    timed_out = containers(tmp_path / "timeout", store, GS_READY_TIMEOUT_S="25")
    assert timed_out.process.wait(timeout=120) == 1
    log = timed_out.log.read_text()
    assert "not every model was READY within 25s" in log and "'broken': 'LOADING'" in log, log[-2000:]
    assert "the workers' last errors:" in log and "Error" in log.split("the workers' last errors:")[1], log[-2000:]


@pytest.mark.parametrize("env, message", [
    ({"GS_DRAIN_TIMEOUT_S": "soon"}, "GS_DRAIN_TIMEOUT_S"),
    ({"TS_DISABLE_TOKEN_AUTH": "maybe"}, "TS_DISABLE_TOKEN_AUTH"),
    ({"GS_MODEL_STORE": "/nonexistent/store"}, "GS_MODEL_STORE"),
    ({"GS_RUN_DIR": "/proc/no-such-run-folder"}, "GS_RUN_DIR"),  # e.g. --read-only without the tmpfs
])
def test_a_bad_setting_is_named_before_anything_starts(tmp_path, store, env, message):
    environ = {**os.environ, "GS_MODEL_STORE": str(store), "GS_CONFIG": str(CONTAINER_CONFIG),
               "GS_RUN_DIR": str(tmp_path / "run"), **env}
    result = subprocess.run([sys.executable, "-m", "graviton_serve.container"], cwd=ROOT, env=environ,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.startswith("error: ")


def test_a_failed_start_reports_only_its_own_worker_errors(tmp_path):
    """TorchServe appends to its logs across starts: the errors a start reports are those it wrote,
    the frontend's word on a worker that did not answer in time included."""
    from graviton_serve.paths import CONFIG_FILE

    server = TorchServe(tmp_path / "run", tmp_path, CONFIG_FILE, ports=Ports.free())
    server.run_folder.logs.mkdir(parents=True)
    server.run_folder.log(MODEL_LOG).write_text("MODEL_LOG - ValueError: from an earlier start\n")
    server.run_folder.log(TS_LOG).write_text("Load model failed: old, error: Worker died.\n")
    server.log_starts = {name: server.run_folder.log(name).stat().st_size for name in (MODEL_LOG, TS_LOG)}
    with open(server.run_folder.log(MODEL_LOG), "a") as log:
        log.write("MODEL_LOG - RuntimeError: this start's\nMODEL_LOG - loading\n")
    with open(server.run_folder.log(TS_LOG), "a") as log:
        log.write("W-9000 - WorkerInitializationException: Backend worker did not respond in given time\n" * 2)
    assert server.worker_errors().splitlines() == [
        "MODEL_LOG - RuntimeError: this start's",
        "WorkerInitializationException: Backend worker did not respond in given time"]


def test_the_documented_timeout_defaults_are_the_constants(tmp_path):
    """The container's docstring table and the README write the two defaults as numbers: they must
    say what drain.DRAIN_TIMEOUT_S and server.READY_TIMEOUT_S are, and the settings must use them."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "any.mar").write_bytes(b"")  # settings only look for an archive; nothing starts
    settings = container_main.ContainerSettings.from_environment(
        {"GS_MODEL_STORE": str(store), "GS_CONFIG": str(CONTAINER_CONFIG), "GS_RUN_DIR": str(tmp_path / "run")})
    assert (settings.drain_timeout_s, settings.ready_timeout_s) == (DRAIN_TIMEOUT_S, READY_TIMEOUT_S)
    readme = (ROOT / "README.md").read_text()
    for variable, seconds in (("GS_DRAIN_TIMEOUT_S", DRAIN_TIMEOUT_S), ("GS_READY_TIMEOUT_S", READY_TIMEOUT_S)):
        assert re.search(rf"^\s+{variable}\s+{seconds}\s", container_main.__doc__, re.M), variable
        assert f"`{variable}`, default {seconds})" in readme or f"`{variable}` (default {seconds})" in readme, variable
