"""``scripts/serve --engine ray``: every archive of a model store on Ray Serve, on a one-node Ray
cluster on this machine (graviton_serve.ray_cluster), started and stopped by its process ids."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from pathlib import Path

import psutil

from graviton_serve.ray_cluster import (FRONT_APP, STOP_GRACE_S, RayError, applications, auth_token_file, deploy,
                                        processes_naming, replicas, serve_config, shutdown_serve,
                                        signal_group, start_node, wait_running, write_key_file)
from graviton_serve.stopping import stop_processes


def process_times(pids: set[int]) -> list[list]:
    """[pid, create time] of each process still there (a pid alone could be reused)."""
    found = []
    for pid in sorted(pids):
        try:
            found.append([pid, psutil.Process(pid).create_time()])
        except psutil.NoSuchProcess:
            pass
    return found


class RayServer:
    """Every archive of a model store on Ray Serve, on a one-node Ray cluster on this machine
    (the head, with every usable CPU); its state in ``<run folder>/ray``. The HTTP address is
    config.properties' ``inference_address``, the body limit its ``max_request_size``."""

    def __init__(self, run_dir: Path, model_store: Path, config_file: Path):
        from graviton_serve.run_folder import RunFolder
        from graviton_serve.torchserve_config import listen_address, read_properties

        self.run_folder = RunFolder(run_dir.resolve())
        self.folder = self.run_folder.ray
        self.model_store = model_store.resolve()
        properties = read_properties(config_file)
        self.host, self.port = listen_address(properties, "inference_address")
        self.max_request_bytes = int(properties.get("max_request_size", 6553500))
        self.state_file = self.folder / "state.json"
        self.key_file = self.folder / "key_file.json"
        self.token_file = self.folder / "ray-auth-token"

    def archives(self) -> list[Path]:
        return sorted(self.model_store.glob("*.mar"))

    def url(self, api: str = "inference", path: str = "") -> str:
        """Like ``TorchServe.url``; Ray Serve has only the inference API."""
        if api != "inference":
            raise ValueError(f"Ray Serve serves no {api} API here: only inference")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "[::]") else self.host
        return f"http://{host}:{self.port}/{path}"

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {json.loads(self.key_file.read_text())['inference']['key']}"}

    def replica_processes(self, model: str) -> list[psutil.Process]:
        """The model's running replicas' processes (as the bench counts a TorchServe model's workers)."""
        state = json.loads(self.state_file.read_text())
        found = []
        for replica in replicas(applications(state["dashboard"], self.token_file).get(model, {})):
            try:
                found.append(psutil.Process(int(replica["pid"])))
            except (psutil.Error, KeyError, ValueError):
                pass
        return found

    def is_running(self) -> bool:
        try:
            state = json.loads(self.state_file.read_text())
            return psutil.Process(state["pid"]).create_time() == state["create_time"]
        except (OSError, ValueError, KeyError, psutil.NoSuchProcess):
            return False

    def start(self, progress, timeout_s: float = 600) -> None:
        from handlers.launch import launch_environment

        cpus = len(os.sched_getaffinity(0))
        archives = self.archives()
        if not archives:
            raise RayError(f"no .mar archives in {self.model_store}")
        try:
            with socket.create_server((self.host.strip("[]"), self.port)):
                pass
        except OSError as error:
            raise RayError(f"cannot listen on {self.host}:{self.port} (inference_address): {error.strerror}; "
                           "is another server listening there? (scripts/serve --stop stops TorchServe)") from None
        token = auth_token_file(self.folder)
        write_key_file(self.key_file)
        progress(f"starting a Ray head node ({cpus} CPUs, token auth on), logs in {self.folder}")
        head = start_node(self.folder / "head", cpus, token)
        process = psutil.Process(head.process.pid)
        self.state_file.write_text(json.dumps({"pid": head.process.pid, "create_time": process.create_time(),
                                               "children": process_times(head.children), "dashboard": head.dashboard_url,
                                               "temp_dir": head.temp_dir}))
        # Each model's replicas (its archive's minWorkers) split all CPUs for their threads, as its
        # TorchServe workers do; the scheduler's share only lets every model fit on the node.
        environment = launch_environment({}, str(self.run_folder.core_locks),
                                         precision_cache_dir=str(self.run_folder.precision_cache))
        config = serve_config(archives, self.port, self.key_file, self.max_request_bytes,
                              cpus_per_replica=round(cpus / max(1, len(archives)), 3), threads=cpus, host=self.host,
                              environment=environment)
        try:
            deploy(config, self.folder / "serve-config.yaml", head.dashboard_url, token)
            progress(f"Serve config {self.folder / 'serve-config.yaml'} deployed; waiting for every model to run")
            wait_running(head.dashboard_url, token, [FRONT_APP, *(a.stem for a in archives)], timeout_s, progress=progress)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Serve's graceful shutdown (in-flight requests answered), then the node: SIGTERM to
        ``ray start``, SIGKILL to what is left of it (recorded, descended, or naming its temp dir)."""
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return
        processes = []
        for pid, create_time in [(state["pid"], state["create_time"]), *state.get("children", [])]:
            try:
                process = psutil.Process(pid)
                if process.create_time() == create_time:  # not a later process that got the same pid
                    processes.append(process)
            except psutil.NoSuchProcess:
                pass
        if processes and processes[0].pid == state["pid"]:
            shutdown_serve(state["dashboard"], self.token_file)
            head = processes[0]
            known = {process.pid for process in processes}
            for pid in {child.pid for child in head.children(recursive=True)} | processes_naming(state["temp_dir"]):
                try:
                    if pid not in known:
                        processes.append(psutil.Process(pid))
                        known.add(pid)
                except psutil.NoSuchProcess:
                    pass
            stop_processes(processes, signal.SIGTERM, STOP_GRACE_S)  # SIGTERM to ray start alone, then kill
            signal_group(state["pid"], signal.SIGKILL)
        if state.get("temp_dir"):
            shutil.rmtree(state["temp_dir"], ignore_errors=True)
        self.state_file.unlink(missing_ok=True)
