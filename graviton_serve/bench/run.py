"""The whole bench run, workload by workload: our server and stock's up side by side, cells
alternated ours/stock in rounds (ABAB, then BABA: drift hits both), the limits timed at the end of
every round (in the precision our server chose), then the report."""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path

from graviton_serve.bench.limit import Limits
from graviton_serve.bench.load import grpc_load, require_wrk, running, running_on_ray, stock_config, wrk_load
from graviton_serve.bench.report import CELL_HEADER, load_run_row, report
from graviton_serve.bench.results import Limit, LoadRun, Workload
from graviton_serve.grpc_client import GrpcClient
from graviton_serve.paths import CONFIG_FILE
from graviton_serve.progress import say

# per server and workload, at the highest concurrency, not reported: long enough for the JVM's JIT
# (with 3 s the first round's frontend spent about twice the CPU per request of later rounds)
WARM_UP_S = 10


def benchmark(workloads: list[Workload], concurrencies: list[int], grpc_concurrencies: list[int], grpc_requests: int,
              seconds: float, rounds: int, out: Path, with_stock: bool = True, with_limit: bool = True,
              with_ray: bool = True) -> str:
    require_wrk()
    cells: list[LoadRun] = []
    limits: list[Limit] = []

    def keep(cell: LoadRun) -> None:
        cells.append(cell)
        print((CELL_HEADER + "\n" if len(cells) == 1 else "") + load_run_row(cell), flush=True)

    with tempfile.TemporaryDirectory(prefix="gs-bench-") as work:
        stock_properties = stock_config(Path(work))
        for workload in workloads:
            body_files = []
            for index, body in enumerate(workload.bodies):
                body_files.append(Path(work) / f"{workload.name}-{index}.body")
                body_files[-1].write_bytes(body)
            with ExitStack() as stack:
                servers = {"ours": (stack.enter_context(running("ours", [workload.ours], CONFIG_FILE)), workload.ours.stem)}
                if with_stock and workload.stock is not None:
                    servers["stock"] = (stack.enter_context(running("stock", [workload.stock], stock_properties)),
                                        workload.stock.stem)
                if with_ray:  # the same archive on Ray Serve: path "ray"
                    servers["ray"] = (stack.enter_context(running_on_ray([workload.ours], CONFIG_FILE)), workload.ours.stem)
                for path, (server, model) in servers.items():
                    wrk_load(server, workload.name, path, model, body_files, max(concurrencies), WARM_UP_S, 0)
                timer = None
                if with_limit:
                    ours_server, ours_model = servers["ours"]
                    precision = ours_server.management(timeout=30).served_precision(ours_model)
                    say(f"bench: {workload.name}: building the limits' workers (serving in {precision}, as our server chose)")
                    timer = stack.enter_context(Limits(workload.name, workload.ours, workload.bodies, precision))
                for round_number in range(1, rounds + 1):
                    order = list(servers) if round_number % 2 else list(reversed(servers))
                    for concurrency in concurrencies:
                        for path in order:
                            server, model = servers[path]
                            say(f"bench: {workload.name} round {round_number}/{rounds}: {path} REST c{concurrency}, {seconds:g} s")
                            keep(wrk_load(server, workload.name, path, model, body_files, concurrency, seconds, round_number))
                    if timer is not None:
                        say(f"bench: {workload.name} round {round_number}/{rounds}: the limits (forward fp32, serving), in this process")
                        limits += timer.measure(round_number)
                server, model = servers["ours"]
                if grpc_concurrencies:
                    with GrpcClient.from_key_file(server.run_folder.key_file, inference_port=server.ports.grpc_inference,
                                                  management_port=server.ports.grpc_management, timeout=300) as grpc:
                        for concurrency in grpc_concurrencies:
                            say(f"bench: {workload.name}: ours gRPC c{concurrency}, {grpc_requests} requests")
                            keep(grpc_load(server, grpc, workload.name, model, workload.bodies, concurrency, grpc_requests))
    text = report(cells, limits, out)
    print("\n" + text, flush=True)
    say(f"bench: results in {out / 'results.md'}, chart {out / 'throughput.png'}")
    return text
