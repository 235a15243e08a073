"""The whole bench run: ours (REST and gRPC), stock (REST), the limit, then the report."""

from __future__ import annotations

import tempfile
from pathlib import Path

from graviton_serve.bench.limit import raw_limit
from graviton_serve.bench.load import serve_and_load, stock_config
from graviton_serve.bench.report import CELL_HEADER, load_run_row, report
from graviton_serve.bench.results import LoadRun, RawForward, Workload
from graviton_serve.paths import CONFIG_FILE
from graviton_serve.progress import say


def benchmark(workloads: list[Workload], rest_concurrencies: list[int], grpc_concurrencies: list[int], count: int,
              out: Path, with_stock: bool = True, with_limit: bool = True) -> str:
    cells: list[LoadRun] = []

    def keep(cell: LoadRun) -> None:
        cells.append(cell)
        print((CELL_HEADER + "\n" if len(cells) == 1 else "") + load_run_row(cell), flush=True)

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
    limits: dict[str, RawForward] = {}
    if with_limit:
        for w in workloads:
            say(f"bench: {w.name} raw forward (the limit)")
            limits[w.name] = raw_limit(w.name, w.ours, w.bodies)
    text = report(cells, limits, out)
    print("\n" + text, flush=True)
    say(f"bench: results in {out / 'results.md'}, chart {out / 'throughput.png'}")
    return text
