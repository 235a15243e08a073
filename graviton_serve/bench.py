"""scripts/bench: ours against the stock path and against the limit, in one run, on one machine.

For each workload, three measurements, taken one after another so none competes for the CPU:
- ours: our archive in a real TorchServe with our config, loaded over REST (and gRPC) at
  several concurrencies;
- stock: the path a user would have without us (TorchServe's own ``image_classifier`` handler
  for vision; for text a handler in the manner of TorchServe's Hugging Face example, padded to
  max_length, fp32), in a real TorchServe under TorchServe's default worker count and batch 1;
- limit: our model's raw in-process forward (collate + forward) at our batch size, with the
  threads and precision our worker decides, and no server.

Columns follow TorchServe's benchmark-ab (throughput, p50/p90/p99/mean latency, errors), plus
the worker processes' CPU seconds per request and their RSS.
"""

from __future__ import annotations

import importlib
import json
import platform
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import psutil
import requests
import yaml

from graviton_serve.archive import unpack_archive
from graviton_serve.grpc_client import GrpcClient
from graviton_serve.paths import CONFIG_FILE
from graviton_serve.progress import say
from graviton_serve.server import Ports, TorchServe, read_properties, write_properties


@dataclass(frozen=True)
class Workload:
    name: str
    ours: Path  # our archive
    bodies: list[bytes]
    stock: Path | None = None  # the stock reference archive, where there is one


@dataclass
class Cell:
    """One load run: a workload on one path, protocol and concurrency."""

    workload: str
    path: str  # "ours" or "stock"
    protocol: str  # "REST" or "gRPC"
    concurrency: int
    requests: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    errors: int
    cpu_s_per_request: float
    rss_mib: int

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]

    def row(self) -> str:
        return (f"| {self.workload} | {self.path} | {self.protocol} | {self.concurrency} | {self.requests} | "
                f"{self.throughput:.2f} | {self.percentile(50):.0f} | {self.percentile(90):.0f} | {self.percentile(99):.0f} | "
                f"{statistics.mean(self.latencies_ms):.0f} | {100 * self.errors / self.requests:.1f} | "
                f"{self.cpu_s_per_request:.3f} | {self.rss_mib} |")


CELL_HEADER = ("| workload | path | protocol | concurrency | requests | throughput (req/s) | p50 (ms) | p90 (ms) | "
               "p99 (ms) | mean (ms) | errors (%) | worker CPU (s/req) | worker RSS (MiB) |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


@dataclass
class Limit:
    workload: str
    batch: int
    threads: int
    precision: str
    items_per_s: float
    forward_ms: float


# -- load ----------------------------------------------------------------------------------------

def model_workers(server: TorchServe, model: str) -> list[psutil.Process]:
    response = requests.get(server.url("management", f"models/{model}"), headers=server.auth("management"), timeout=10)
    response.raise_for_status()
    processes = []
    for worker in response.json()[0].get("workers", []):
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
             concurrency: int, count: int, grpc: GrpcClient | None = None, warmup: int = 3) -> Cell:
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
    return Cell(workload, path, protocol, concurrency, count, seconds, [ms for ms, _ in outcomes],
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


# -- the limit: our raw forward ------------------------------------------------------------------

def raw_limit(workload: str, archive: Path, bodies: list[bytes], min_seconds: float = 5.0) -> Limit:
    """Our handler's collate + forward on one full batch, in this process, as a worker would run it."""
    from handlers.core import Worker
    from handlers.payload import Payload

    with tempfile.TemporaryDirectory(prefix="gs-bench-raw-") as work:
        manifest = unpack_archive(archive, Path(work))
        config = yaml.safe_load((Path(work) / "model-config.yaml").read_text())
        module = importlib.import_module(f"handlers.{Path(manifest['model']['handler']).stem}")
        context = SimpleNamespace(model_name=workload, manifest=manifest, model_yaml_config=config,
                                  system_properties={"model_dir": work, "gpu_id": None})
        worker = Worker(module.handle.make_handler(), context)
        batch = int(config.get("batchSize", 1))
        decoded = []
        for body in bodies[: 4 * batch]:
            try:
                decoded.append(worker.handler.decode(Payload(body=body)))
            except Exception:  # noqa: BLE001 - a body the model refuses is no part of its forward
                pass
        if not decoded:
            raise ValueError(f"{workload}: none of the bodies decodes; nothing to time")
        items = [decoded[i % len(decoded)] for i in range(batch)]
        for _ in range(2):
            worker._forward(items)
        times = []
        started = time.perf_counter()
        while time.perf_counter() - started < min_seconds or len(times) < 3:
            begin = time.perf_counter()
            worker._forward(items)
            times.append(time.perf_counter() - begin)
        forward = statistics.median(times)
        return Limit(workload, batch, worker.tuning.threads, worker.precision, batch / forward, forward * 1000)


# -- report ----------------------------------------------------------------------------------------

def machine_line() -> str:
    import torch
    import ts

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    return (f"{model}, {len(psutil.Process().cpu_affinity())} CPUs, {psutil.virtual_memory().total >> 30} GiB, "
            f"{platform.machine()}; torch {torch.__version__}, TorchServe {ts.__version__}")


def summary(cells: list[Cell], limits: dict[str, Limit]) -> str:
    """Per workload, at the highest REST concurrency: ours against stock and against the limit."""
    lines = ["| workload | ours (req/s) | stock (req/s) | limit (items/s) | ours/stock | ours/limit | ours p99 (ms) | stock p99 (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for workload in dict.fromkeys(cell.workload for cell in cells):
        rest = [cell for cell in cells if cell.workload == workload and cell.protocol == "REST"]
        top = max(cell.concurrency for cell in rest)
        ours = _clean(next((c for c in rest if c.path == "ours" and c.concurrency == top), None))
        stock = _clean(next((c for c in rest if c.path == "stock" and c.concurrency == top), None))
        limit = limits.get(workload)
        lines.append(
            f"| {workload} (c{top}) | {_f(ours and ours.throughput)} | {_f(stock and stock.throughput)} | "
            f"{_f(limit and limit.items_per_s)} | {_ratio(ours, stock and stock.throughput)} | "
            f"{_ratio(ours, limit and limit.items_per_s)} | {_f(ours and ours.percentile(99), 0)} | "
            f"{_f(stock and stock.percentile(99), 0)} |")
    return "\n".join(lines)


def _clean(cell: Cell | None) -> Cell | None:
    """A run with errors is no figure to compare (its table row still shows it)."""
    return cell if cell is not None and cell.errors == 0 else None


def _f(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ratio(ours: Cell | None, reference: float | None) -> str:
    return "—" if not ours or not reference else f"{ours.throughput / reference:.2f}×"


def limits_table(limits: dict[str, Limit]) -> str:
    lines = ["| workload | batch | threads | precision | forward (ms) | items/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {l.workload} | {l.batch} | {l.threads} | {l.precision} | {l.forward_ms:.0f} | {l.items_per_s:.2f} |"
              for l in limits.values()]
    return "\n".join(lines)


def chart(cells: list[Cell], limits: dict[str, Limit], path: Path) -> None:
    """Ours and stock as a share of the raw-forward limit (so MNIST and DenseNet share one
    scale), each bar labelled with its req/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w for w in dict.fromkeys(cell.workload for cell in cells) if w in limits]
    figure, axis = plt.subplots(figsize=(10, 4.5))
    width = 0.38
    for offset, (name, label) in enumerate((("ours", "graviton-serve"), ("stock", "stock TorchServe"))):
        shares, texts = [], []
        for workload in workloads:
            rest = [c for c in cells if c.workload == workload and c.protocol == "REST"]
            top = max(c.concurrency for c in rest)
            cell = _clean(next((c for c in rest if c.path == name and c.concurrency == top), None))
            shares.append(100 * cell.throughput / limits[workload].items_per_s if cell else 0)
            texts.append(f"{cell.throughput:.1f}/s" if cell else "n/a")
        bars = axis.bar([i + (offset - 0.5) * width for i in range(len(workloads))], shares, width, label=label)
        axis.bar_label(bars, labels=texts, fontsize=7)
    axis.axhline(100, color="grey", linestyle="--", linewidth=1)
    axis.set_xticks(range(len(workloads)), [f"{w}\n(limit {limits[w].items_per_s:.1f}/s)" for w in workloads], fontsize=8)
    axis.set_ylabel("% of the raw-forward limit")
    axis.set_ylim(0, 110)
    top_concurrency = max(c.concurrency for c in cells if c.protocol == "REST")
    axis.set_title(f"Throughput over REST at concurrency {top_concurrency}, as a share of the model's raw forward\n"
                   f"{machine_line()}", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(cells: list[Cell], limits: dict[str, Limit], out: Path) -> str:
    text = "\n\n".join([
        f"Machine: {machine_line()}",
        "Ours against stock and the limit:\n\n" + summary(cells, limits),
        "Every load run:\n\n" + CELL_HEADER + "\n" + "\n".join(cell.row() for cell in cells),
        "The limit (raw collate + forward in one process, no server):\n\n" + limits_table(limits),
    ]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({
        "machine": machine_line(),
        "cells": [{**asdict(cell), "throughput": cell.throughput, "p50": cell.percentile(50), "p90": cell.percentile(90),
                   "p99": cell.percentile(99)} for cell in cells],
        "limits": [asdict(limit) for limit in limits.values()],
    }, indent=1))
    chart(cells, limits, out / "throughput.png")
    return text


# -- the whole run -----------------------------------------------------------------------------

def benchmark(workloads: list[Workload], rest_concurrencies: list[int], grpc_concurrencies: list[int], count: int,
              out: Path, with_stock: bool = True, with_limit: bool = True) -> str:
    cells: list[Cell] = []

    def keep(cell: Cell) -> None:
        cells.append(cell)
        print((CELL_HEADER + "\n" if len(cells) == 1 else "") + cell.row(), flush=True)

    bodies = {w.name: w.bodies for w in workloads}
    plan = [(w.name, "REST", c) for w in workloads for c in rest_concurrencies]
    plan += [(w.name, "gRPC", c) for w in workloads for c in grpc_concurrencies]
    plan.sort(key=lambda step: [w.name for w in workloads].index(step[0]))
    serve_and_load("ours", {w.name: w.ours for w in workloads}, CONFIG_FILE, plan, bodies, count, "ours", keep)
    stock = {w.name: w.stock for w in workloads if w.stock is not None}
    if with_stock and stock:
        with tempfile.TemporaryDirectory(prefix="gs-bench-stock-config-") as work:
            stock_plan = [(name, "REST", c) for name in stock for c in rest_concurrencies]
            serve_and_load("stock", stock, stock_config(Path(work)), stock_plan, bodies, count, "stock", keep)
    limits: dict[str, Limit] = {}
    if with_limit:
        for w in workloads:
            say(f"bench: {w.name} raw forward (the limit)")
            limits[w.name] = raw_limit(w.name, w.ours, w.bodies)
    text = report(cells, limits, out)
    print("\n" + text, flush=True)
    say(f"bench: results in {out / 'results.md'}, chart {out / 'throughput.png'}")
    return text
