"""Load generation: our or the stock archives in a real TorchServe on free ports; REST load from
wrk (C, event loop, one thread: what it spends is reported), gRPC from a Python thread pool; the
worker processes' CPU time and RSS."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import psutil
import requests

from graviton_serve.bench.results import LoadRun, Stages
from graviton_serve.grpc_client import GrpcClient
from graviton_serve.paths import CONFIG_FILE
from graviton_serve.progress import say
from graviton_serve.server import TorchServe
from graviton_serve.torchserve_config import Ports, read_properties, write_properties
from handlers.torchserve_wire import BATCH_ITEMS_METRIC, BATCHES_METRIC, STAGE_SECONDS_METRIC

WRK_SCRIPT = Path(__file__).parent / "post_bodies.lua"
WRK_TIMEOUT = "300s"  # wrk's default (2 s) would count stock's slow answers at c8 as errors


def require_wrk() -> str:
    """wrk's path; installed from the OS (Debian's wrk package) when missing and we are root."""
    found = shutil.which("wrk")
    if found:
        return found
    from graviton_serve.debian import apt_install

    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError("scripts/bench needs wrk (the HTTP load client): install it, e.g. apt-get install wrk")
    say("bench: installing wrk (the HTTP load client) with apt-get")
    apt_install(["wrk"])
    return shutil.which("wrk") or "wrk"


def model_workers(server, model: str) -> list[psutil.Process]:
    """The processes that run the model: TorchServe's workers, or Ray Serve's replicas."""
    if hasattr(server, "replica_processes"):
        return server.replica_processes(model)
    processes = []
    for worker in server.management(timeout=10).model(model).get("workers", []):
        try:
            processes.append(psutil.Process(int(worker["pid"])))
        except (psutil.Error, KeyError, ValueError):
            pass
    return processes


def _total(processes: list[psutil.Process], measure: Callable[[psutil.Process], float]) -> float:
    """``measure`` summed over the processes (one that has exited counts nothing)."""
    total = 0.0
    for process in processes:
        try:
            total += measure(process)
        except psutil.Error:
            pass
    return total


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    return _total(processes, lambda process: sum(process.cpu_times()[:2]))  # user + system


def _rss_mib(processes: list[psutil.Process]) -> int:
    return int(_total(processes, lambda process: process.memory_info().rss)) >> 20


def frontend_processes(server) -> list[psutil.Process]:
    """TorchServe's Java frontend (the server's own PID); none for Ray Serve."""
    if hasattr(server, "replica_processes") or server.pid is None:
        return []
    try:
        return [psutil.Process(server.pid)]
    except psutil.Error:
        return []


STAGE_COUNTER = re.compile(r'^(graviton_serve_\w+?)(\{[^}]*\})? ([0-9.eE+-]+)$')  # name, labels, value
STAGE_LABEL = re.compile(r'Stage="(\w+)"')


def stage_counters(server) -> dict[str, float] | None:
    """Our handlers' per-stage counters (handlers.torchserve_wire) summed over the server's
    workers, from its Prometheus metrics listener; None where there are none (stock, Ray Serve)."""
    if hasattr(server, "replica_processes"):
        return None
    try:
        return parse_stage_counters(requests.get(server.url("metrics", "metrics"), timeout=10).text)
    except requests.RequestException:
        return None


def parse_stage_counters(text: str) -> dict[str, float] | None:
    """Prometheus text -> {"<counter>" or "<counter>:<Stage>": value summed over the other labels}."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = STAGE_COUNTER.match(line)
        if match:
            name, labels, value = match.groups()
            stage = STAGE_LABEL.search(labels or "")
            key = f"{name}:{stage.group(1)}" if stage else name
            found[key] = found.get(key, 0.0) + float(value)
    return found or None


def stages_between(before: dict[str, float] | None, after: dict[str, float] | None, workers: int,
                   seconds: float) -> Stages | None:
    """The counters' growth over a cell of ``seconds`` with ``workers`` worker processes."""
    if not before or not after:
        return None
    grown = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    batches = grown.get(BATCHES_METRIC, 0.0)
    if batches <= 0:
        return None
    spent = [grown.get(f"{STAGE_SECONDS_METRIC}:{stage}", 0.0) for stage in ("decode", "forward", "encode")]
    return Stages(int(batches), grown.get(BATCH_ITEMS_METRIC, 0.0) / batches, *(1000 * s / batches for s in spent),
                  sum(spent) / max(1e-9, workers * seconds))


def settle(server, model: str, timeout: float = 300.0) -> None:
    """Wait until the model has nothing queued and its workers are idle: wrk stops sending when
    its time is up, but what it sent last is still being answered, and would otherwise run into
    the next cell (on the other server). (Ray Serve has no management API: idle workers only.)"""
    workers = model_workers(server, model)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = _cpu_seconds(workers)
        time.sleep(0.3)
        pending = 0 if hasattr(server, "replica_processes") else server.management(timeout=10).pending_requests(model)
        if pending == 0 and _cpu_seconds(workers) - before < 0.03:
            return
    raise RuntimeError(f"{model} still busy {timeout:.0f} s after its load ended")


def wrk_load(server, workload: str, path: str, model: str, body_files: list[Path], concurrency: int,
             seconds: float, round_number: int) -> LoadRun:
    """``seconds`` of POSTs from wrk (one thread, ``concurrency`` keep-alive connections), the
    bodies in turn; the worker processes' CPU and wrk's own, from the kernel's accounting. Returns
    once the server has answered what was still in flight (not counted: wrk had stopped)."""
    url = server.url("inference", f"predictions/{model}")
    headers = [f"{key}: {value}" for key, value in {**server.auth(), "Content-Type": "application/octet-stream"}.items()]
    command = [require_wrk(), "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", f"--timeout={WRK_TIMEOUT}",
               "-s", str(WRK_SCRIPT), *[arg for header in headers for arg in ("-H", header)], url, "--",
               *map(str, body_files)]
    workers, frontend = model_workers(server, model), frontend_processes(server)
    cpu_before, frontend_before, counters_before = _cpu_seconds(workers), _cpu_seconds(frontend), stage_counters(server)
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)  # the kernel's count of wrk's own CPU time
    process.returncode = os.waitstatus_to_exitcode(status)
    stdout, stderr = process.stdout.read(), process.stderr.read()
    wall = time.perf_counter() - started
    cpu, frontend_cpu = _cpu_seconds(workers) - cpu_before, _cpu_seconds(frontend) - frontend_before
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed ({process.returncode}): {stderr.strip()[-500:]}")
    settle(server, model)
    # after settling: the few batches still in flight when wrk stopped count too
    stages = stages_between(counters_before, stage_counters(server), len(workers), wall)
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("{")))
    answered = result["requests"]
    return LoadRun(workload, path, "REST", concurrency, round_number, answered, result["duration_us"] / 1e6,
                   result["p50_us"] / 1000, result["p90_us"] / 1000, result["p99_us"] / 1000, result["mean_us"] / 1000,
                   result["errors"], cpu / max(1, answered), _rss_mib(workers),
                   (usage.ru_utime + usage.ru_stime) / wall, frontend_cpu / max(1, answered), stages)


def grpc_load(server: TorchServe, grpc: GrpcClient, workload: str, model: str, bodies: list[bytes], concurrency: int,
              count: int, warmup: int = 3) -> LoadRun:
    """``count`` gRPC Predictions calls from a thread pool (Python: gRPC has no wrk here)."""

    def one(number: int) -> tuple[float, bool]:
        started = time.perf_counter()
        reply = json.loads(grpc.predict(model, {"data": bodies[number % len(bodies)]}))
        ok = not (isinstance(reply, dict) and "code" in reply and "type" in reply)  # our error body
        return (time.perf_counter() - started) * 1000, ok

    for number in range(warmup):
        one(number)
    workers = model_workers(server, model)
    cpu_before = _cpu_seconds(workers)
    client_before = psutil.Process().cpu_times()
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(one, range(count)))
    seconds = time.perf_counter() - started
    client_after = psutil.Process().cpu_times()
    cpu = _cpu_seconds(workers) - cpu_before
    latencies = sorted(ms for ms, _ in outcomes)

    def percentile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(round(q / 100 * (len(latencies) - 1))))]

    client = (client_after.user + client_after.system) - (client_before.user + client_before.system)
    return LoadRun(workload, "ours", "gRPC", concurrency, 1, count, seconds, percentile(50), percentile(90), percentile(99),
                   statistics.mean(latencies), sum(not ok for _, ok in outcomes), cpu / count, _rss_mib(workers),
                   client / seconds)


@contextmanager
def running(label: str, archives: list[Path], config: Path) -> Iterator[TorchServe]:
    """One TorchServe over ``archives`` on free ports, for the block."""
    with tempfile.TemporaryDirectory(prefix=f"gs-bench-{label}-") as work:
        store = Path(work) / "store"
        store.mkdir()
        for archive in archives:
            shutil.copy2(archive, store / archive.name)
        server = TorchServe(Path(work) / "run", store, config, ports=Ports.free())
        say(f"bench: starting TorchServe ({label}) with {', '.join(a.stem for a in archives)}")
        server.start(timeout=300)
        try:
            yield server
        finally:
            say(f"bench: stopping TorchServe ({label})")
            server.stop()


@contextmanager
def running_on_ray(archives: list[Path], config: Path) -> Iterator["RayServer"]:
    """The same archives on Ray Serve (a one-node Ray cluster, ``scripts/serve --engine ray``'s
    setup) on a free port, for the block."""
    from graviton_serve.ray_server import RayServer
    from graviton_serve.torchserve_config import free_loopback_ports

    with tempfile.TemporaryDirectory(prefix="gs-bench-ray-") as work:
        store = Path(work) / "store"
        store.mkdir()
        for archive in archives:
            shutil.copy2(archive, store / archive.name)
        properties = read_properties(config)
        properties["inference_address"] = f"http://127.0.0.1:{free_loopback_ports(1)[0]}"
        write_properties(Path(work) / "config.properties", properties)
        server = RayServer(Path(work) / "run", store, Path(work) / "config.properties")
        say(f"bench: starting Ray Serve (ours) with {', '.join(a.stem for a in archives)}")
        server.start(lambda line: None, timeout_s=300)
        try:
            yield server
        finally:
            say("bench: stopping Ray Serve (ours)")
            server.stop()


def stock_config(work: Path) -> Path:
    """Our config (ports, auth, limits) without our worker count: TorchServe then starts its
    default, one worker per CPU core, each with torch's default threads."""
    properties = read_properties(CONFIG_FILE)
    properties.pop("default_workers_per_model", None)
    path = work / "stock-config.properties"
    write_properties(path, properties)
    return path
