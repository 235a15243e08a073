"""Starting, watching and stopping a real TorchServe (Java frontend + Python workers).

One ``TorchServe`` is one server instance with its own run folder: the rendered
config.properties, logs, key file, metrics and temp files (TorchServe writes its pid file to
Python's temp dir and worker sockets to Java's, so each instance gets its own TMPDIR and the
tests never touch another server). It is stopped by its own PIDs, never by process name.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

from graviton_serve.java import find_java_home
from handlers.launch import launch_environment

# Keys TorchServe 0.12's ConfigManager reads; anything else in a config file is a typo.
KNOWN_KEYS = frozenset("""
inference_address management_address metrics_address grpc_inference_address grpc_inference_port
grpc_management_address grpc_management_port enable_grpc_ssl model_store workflow_store load_models
models default_workers_per_model default_response_timeout default_startup_timeout
unregister_model_timeout job_queue_size max_request_size max_response_size number_of_netty_threads
netty_client_threads number_of_gpu metrics_mode metrics_config enable_metrics_api
disable_system_metrics system_metrics_cmd metric_time_interval model_metrics_auto_detect
disable_token_authorization token_expiration_min enable_model_api allowed_urls use_env_allowed_urls
install_py_dep_per_model enable_envvars_config blacklist_env_vars vmargs async_logging
cors_allowed_origin cors_allowed_methods cors_allowed_headers keystore keystore_pass keystore_type
certificate_file private_key_file limit_max_image_pixels cpu_launcher_enable cpu_launcher_args
ipex_enable ipex_gpu_enable service_envelope decode_input_request prefer_direct_buffer
initial_worker_port initial_distribution_port plugins_path model_server_home use_native_io
io_ratio ts_header_key_sequence_id ts_header_key_sequence_start ts_header_key_sequence_end
ts_open_inference_protocol enable_grpc torchelastic_ts cpp_log_config model_snapshot
""".split())


class ConfigError(ValueError):
    pass


class ServerError(RuntimeError):
    pass


def read_properties(path: Path) -> dict[str, str]:
    """A config.properties file as a dict; an unknown or repeated key is an error naming it."""
    properties: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"{path}:{number}: expected key=value, got '{line[:60]}'")
        if key not in KNOWN_KEYS:
            raise ConfigError(f"{path}:{number}: unknown key '{key}' (not a TorchServe 0.12 setting)")
        if key in properties:
            raise ConfigError(f"{path}:{number}: key '{key}' is set twice")
        properties[key] = value.strip()
    return properties


def write_properties(path: Path, properties: dict[str, str]) -> None:
    path.write_text("".join(f"{key}={value}\n" for key, value in properties.items()))


@dataclass(frozen=True)
class Ports:
    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071

    @classmethod
    def free(cls) -> "Ports":
        """Five currently free loopback ports (for tests and side-by-side servers)."""
        sockets = []
        try:
            for _ in range(5):
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                sockets.append(s)
            return cls(*(s.getsockname()[1] for s in sockets))
        finally:
            for s in sockets:
                s.close()


def _port_of(properties: dict[str, str], key: str) -> int:
    match = re.search(r":(\d+)/?$", properties.get(key, ""))
    if not match:
        raise ConfigError(f"config key '{key}' must be an address with a port, e.g. http://127.0.0.1:8080")
    return int(match.group(1))


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
        self.base_properties = read_properties(Path(config_file))
        unknown = sorted(set(overrides or {}) - KNOWN_KEYS)
        if unknown:
            raise ConfigError(f"unknown key '{unknown[0]}' (not a TorchServe 0.12 setting)")
        self.base_properties.update(overrides or {})
        self.properties = self._render(ports, host)
        self.ports = Ports(
            _port_of(self.properties, "inference_address"),
            _port_of(self.properties, "management_address"),
            _port_of(self.properties, "metrics_address"),
            int(self.properties.get("grpc_inference_port", "7070")),
            int(self.properties.get("grpc_management_port", "7071")),
        )
        self.host = re.sub(r"^https?://|:\d+/?$", "", self.properties["inference_address"])
        if self.host in ("0.0.0.0", "[::]"):
            self.host = "127.0.0.1"
        self.config_path = self.run_dir / "config.properties"
        self.log_dir = self.run_dir / "logs"
        self.tmp_dir = self.run_dir / "tmp"
        self.pid_file = self.tmp_dir / ".model_server.pid"
        self.busy_dir = self.run_dir / "busy"  # a file per worker pid while it handles a batch

    def _render(self, ports: Ports | None, host: str | None) -> dict[str, str]:
        properties = dict(self.base_properties)
        properties["model_store"] = str(self.model_store)
        # Only archives inside this model store may be loaded.
        properties["allowed_urls"] = "file://" + re.escape(str(self.model_store)) + "/.*\\.mar"
        if ports or host:
            ports = ports or Ports()
            scheme_host = f"http://{host or '127.0.0.1'}"
            properties["inference_address"] = f"{scheme_host}:{ports.inference}"
            properties["management_address"] = f"{scheme_host}:{ports.management}"
            properties["metrics_address"] = f"{scheme_host}:{ports.metrics}"
            properties["grpc_inference_address"] = host or "127.0.0.1"
            properties["grpc_management_address"] = host or "127.0.0.1"
            properties["grpc_inference_port"] = str(ports.grpc_inference)
            properties["grpc_management_port"] = str(ports.grpc_management)
        return properties

    # -- addresses and credentials ------------------------------------------------------------

    def url(self, api: str, path: str = "") -> str:
        port = {"inference": self.ports.inference, "management": self.ports.management, "metrics": self.ports.metrics}[api]
        return f"http://{self.host}:{port}/{path.lstrip('/')}"

    @property
    def key_file(self) -> Path:
        return self.run_dir / "key_file.json"

    def token(self, api: str = "inference") -> str:
        """The bearer token for ``inference`` or ``management`` from this instance's key file."""
        keys = json.loads(self.key_file.read_text())
        return keys[api]["key"]

    @property
    def token_auth(self) -> bool:
        return self.properties.get("disable_token_authorization", "false").strip().lower() != "true"

    def auth(self, api: str = "inference") -> dict[str, str]:
        """The Authorization header for ``api`` (none when token auth is off)."""
        return {"Authorization": f"Bearer {self.token(api)}"} if self.token_auth else {}

    # -- life cycle ----------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
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
            core_lock_dir=str(self.run_dir / "cores"),
            busy_dir=str(self.busy_dir),
        )
        env.update(
            JAVA_HOME=str(find_java_home()),
            TMPDIR=str(self.tmp_dir),
            TEMP=str(self.tmp_dir),
            LOG_LOCATION=str(self.log_dir),
            METRICS_LOCATION=str(self.log_dir),
        )
        return env

    def start(self, timeout: float = 180.0, foreground: bool = False) -> subprocess.Popen | None:
        """Start TorchServe and wait until every model in the store has a READY worker.

        With ``foreground`` the launcher process stays attached and is returned (for containers).
        """
        if self.is_running():
            raise ServerError(f"a TorchServe of this run folder is already running (pid {self.pid}); stop it first")
        for folder in (self.run_dir, self.log_dir, self.tmp_dir, self.busy_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.pid_file.unlink(missing_ok=True)
        self.key_file.unlink(missing_ok=True)
        write_properties(self.config_path, self.properties)
        command = [
            str(Path(sys.executable).with_name("torchserve")), "--start",
            "--ts-config", str(self.config_path),
            "--model-store", str(self.model_store),
        ]
        if foreground:
            command.append("--foreground")
        with open(self.log_dir / "console.log", "ab") as console:
            launcher = subprocess.Popen(
                command, cwd=self.run_dir, env=self.environment(), stdout=console, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        try:
            if not foreground:
                launcher.wait(timeout=60)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return launcher if foreground else None

    def expected_models(self) -> list[str]:
        return sorted(path.stem for path in self.model_store.glob("*.mar"))

    def wait_ready(self, timeout: float) -> dict[str, str]:
        """Wait until each model of the store has a READY worker; returns name -> status."""
        deadline = time.monotonic() + timeout
        expected = self.expected_models()
        status: dict[str, str] = {}
        while time.monotonic() < deadline:
            if self.pid is not None and not self.is_running():
                raise ServerError(f"TorchServe exited during start-up; see {self.log_dir / 'ts_log.log'}\n{self.log_tail()}")
            if self.key_file.exists() or not self.token_auth:
                status = {name: self.model_status(name) for name in expected}
                if all(state == "READY" for state in status.values()):
                    return status
            time.sleep(0.5)
        raise ServerError(
            f"not every model was READY within {timeout:.0f}s: {status or 'frontend not up'}; "
            f"see {self.log_dir}\n{self.log_tail()}"
        )

    def model_status(self, name: str) -> str:
        try:
            response = requests.get(self.url("management", f"models/{name}"), headers=self.auth("management"), timeout=5)
        except (requests.RequestException, OSError, KeyError, ValueError):
            return "UNREACHABLE"
        if response.status_code != 200:
            return f"HTTP {response.status_code}"
        workers = response.json()[0].get("workers", [])
        return "READY" if any(worker.get("status") == "READY" for worker in workers) else "LOADING"

    def in_flight(self) -> int:
        """Requests TorchServe holds now: queued (each model's pendingRequests) plus batches
        inside workers (their busy files, written by the handler core)."""
        queued = 0
        for name in self.expected_models():
            try:
                response = requests.get(self.url("management", f"models/{name}"), headers=self.auth("management"), timeout=5)
                queued += int(response.json()[0].get("jobQueueStatus", {}).get("pendingRequests", 0))
            except (requests.RequestException, OSError, KeyError, ValueError, IndexError):
                pass
        busy = sum(1 for marker in self.busy_dir.glob("*") if psutil.pid_exists(int(marker.name)))
        return queued + busy

    def drain(self, timeout: float, settle: float = 0.3) -> int:
        """Wait until nothing is in flight (seen twice, ``settle`` apart, to cover the hand-over
        from queue to worker) or ``timeout`` passes; returns what is left in flight."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.in_flight() == 0:
                time.sleep(settle)
                if self.in_flight() == 0:
                    time.sleep(settle)  # the last responses leave the frontend
                    return 0
            time.sleep(0.2)
        return self.in_flight()

    def processes(self) -> list[psutil.Process]:
        """The frontend and all its descendants (the Python workers)."""
        if not self.is_running():
            return []
        frontend = psutil.Process(self.pid)
        return [frontend, *frontend.children(recursive=True)]

    def stop(self, timeout: float = 60.0) -> None:
        """Stop this instance and wait until its processes have exited."""
        processes = self.processes()
        if processes:
            processes[0].send_signal(signal.SIGTERM)
            _, alive = psutil.wait_procs(processes, timeout=timeout)
            for process in alive:
                process.kill()
            psutil.wait_procs(alive, timeout=10)
        self.pid_file.unlink(missing_ok=True)
        self.key_file.unlink(missing_ok=True)

    def log_tail(self, lines: int = 20, name: str = "ts_log.log") -> str:
        path = self.log_dir / name
        if not path.exists():
            path = self.log_dir / "console.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
