"""Load generation: our or the stock archives in a real TorchServe on free ports, requests over REST
or gRPC from a thread pool at a given concurrency, and the worker processes' CPU time and RSS."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests

from graviton_serve.bench.results import LoadRun
from graviton_serve.grpc_client import GrpcClient
from graviton_serve.paths import CONFIG_FILE
from graviton_serve.progress import say
from graviton_serve.server import TorchServe
from graviton_serve.torchserve_config import Ports, read_properties, write_properties


def model_workers(server: TorchServe, model: str) -> list[psutil.Process]:
    processes = []
    for worker in server.management(timeout=10).model(model).get("workers", []):
        try:
            processes.append(psutil.Process(int(worker["pid"])))
        except (psutil.Error, KeyError, ValueError):
            pass
    return processes


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def run_load(server: TorchServe, workload: str, path: str, model: str, bodies: list[bytes], protocol: str,
             concurrency: int, count: int, grpc: GrpcClient | None = None, warmup: int = 3) -> LoadRun:
    url = server.url("inference", f"predictions/{model}")
    headers = {**server.auth(), "Content-Type": "application/octet-stream"}
    session = requests.Session()

    def one(number: int) -> tuple[float, bool]:
        body = bodies[number % len(bodies)]
        started = time.perf_counter()
        if protocol == "gRPC":
            reply = json.loads(grpc.predict(model, {"data": body}))
            ok = not (isinstance(reply, dict) and "code" in reply and "type" in reply)  # our error body
        else:
            ok = session.post(url, data=body, headers=headers, timeout=300).status_code == 200
        return (time.perf_counter() - started) * 1000, ok

    for number in range(warmup):
        one(number)
    workers = model_workers(server, model)
    cpu_before = _cpu_seconds(workers)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(one, range(count)))
    seconds = time.perf_counter() - started
    cpu = _cpu_seconds(workers) - cpu_before
    rss = sum(process.memory_info().rss for process in workers if process.is_running()) >> 20
    return LoadRun(workload, path, protocol, concurrency, count, seconds, [ms for ms, _ in outcomes],
                sum(not ok for _, ok in outcomes), cpu / count, rss)


def serve_and_load(label: str, archives: dict[str, Path], config: Path, plan: list[tuple[str, str, int]],
                   bodies: dict[str, list[bytes]], count: int, path: str, on_cell) -> None:
    """Start one TorchServe over ``archives`` (workload -> archive), run each (workload, protocol,
    concurrency) of ``plan``, stop it."""
    with tempfile.TemporaryDirectory(prefix=f"gs-bench-{label}-") as work:
        store = Path(work) / "store"
        store.mkdir()
        for archive in archives.values():
            shutil.copy2(archive, store / archive.name)
        server = TorchServe(Path(work) / "run", store, config, ports=Ports.free())
        say(f"bench: starting TorchServe ({label}) with {', '.join(a.stem for a in archives.values())}")
        server.start(timeout=300)
        try:
            with GrpcClient.from_key_file(server.key_file, inference_port=server.ports.grpc_inference,
                                          management_port=server.ports.grpc_management, timeout=300) as grpc:
                for workload, protocol, concurrency in plan:
                    if workload not in archives:
                        continue
                    say(f"bench: {workload} {path} {protocol} concurrency {concurrency}, {count} requests")
                    on_cell(run_load(server, workload, path, archives[workload].stem, bodies[workload], protocol,
                                     concurrency, count, grpc))
        finally:
            server.stop()


def stock_config(work: Path) -> Path:
    """Our config (ports, auth, limits) without our worker count: TorchServe then starts its
    default, one worker per CPU core, each with torch's default threads."""
    properties = read_properties(CONFIG_FILE)
    properties.pop("default_workers_per_model", None)
    path = work / "stock-config.properties"
    write_properties(path, properties)
    return path
