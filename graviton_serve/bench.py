"""Load against a real TorchServe: latency and throughput per model and concurrency.

Columns follow TorchServe's own benchmark (benchmark-ab.py): throughput, p50/p90/p99/mean
latency, error rate. A fresh TorchServe is started on free loopback ports over the chosen
archives of the model store (so it never disturbs a running `scripts/serve`), and stopped after.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

from graviton_serve.paths import CONFIG_FILE
from graviton_serve.progress import say
from graviton_serve.server import Ports, TorchServe


@dataclass(frozen=True)
class Result:
    model: str
    concurrency: int
    requests: int
    seconds: float
    latencies_ms: list[float]
    errors: int

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]

    def row(self) -> str:
        return (f"| {self.model} | {self.concurrency} | {self.requests} | {self.throughput:.2f} | {self.percentile(50):.0f} | "
                f"{self.percentile(90):.0f} | {self.percentile(99):.0f} | {statistics.mean(self.latencies_ms):.0f} | "
                f"{100 * self.errors / self.requests:.1f} |")


HEADER = ("| model | concurrency | requests | throughput (req/s) | p50 (ms) | p90 (ms) | p99 (ms) | mean (ms) | errors (%) |\n"
          "|---|---|---|---|---|---|---|---|---|")


def run_load(server: TorchServe, model: str, bodies: list[bytes], concurrency: int, count: int, warmup: int = 3) -> Result:
    url = server.url("inference", f"predictions/{model}")
    headers = {**server.auth(), "Content-Type": "application/octet-stream"}
    session = requests.Session()

    def one(number: int) -> tuple[float, bool]:
        started = time.perf_counter()
        response = session.post(url, data=bodies[number % len(bodies)], headers=headers, timeout=300)
        return (time.perf_counter() - started) * 1000, response.status_code == 200

    for _ in range(warmup):
        one(0)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(one, range(count)))
    seconds = time.perf_counter() - started
    return Result(model, concurrency, count, seconds, [ms for ms, _ in outcomes], sum(not ok for _, ok in outcomes))


def worker_rss_mib(server: TorchServe) -> dict[str, int]:
    frontend, *workers = server.processes()
    sizes = {"frontend": frontend.memory_info().rss >> 20}
    for worker in workers:
        try:
            sizes[f"worker pid {worker.pid}"] = worker.memory_info().rss >> 20
        except psutil.Error:
            pass
    return sizes


def benchmark(archives: list[Path], bodies: dict[str, list[bytes]], concurrencies: list[int], count: int) -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory(prefix="gs-bench-") as work:
        store = Path(work) / "store"
        store.mkdir()
        for archive in archives:
            shutil.copy2(archive, store / archive.name)
        server = TorchServe(Path(work) / "run", store, CONFIG_FILE, ports=Ports.free())
        say(f"bench: starting TorchServe with {', '.join(a.stem for a in archives)}")
        server.start()
        try:
            for archive in archives:
                for concurrency in concurrencies:
                    say(f"bench: {archive.stem} at concurrency {concurrency}, {count} requests")
                    result = run_load(server, archive.stem, bodies[archive.stem], concurrency, count)
                    results.append(result)
                    print(result.row() if len(results) > 1 else HEADER + "\n" + result.row(), flush=True)
            for name, mib in worker_rss_mib(server).items():
                print(f"RSS {name}: {mib} MiB", flush=True)
        finally:
            server.stop()
    return results
