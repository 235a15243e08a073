"""The whole bench run, workload by workload: our server and stock's up side by side, cells
alternated ours/stock in rounds (ABAB, then BABA: drift hits both), the limits timed at the end of
every round (in the precision our server chose); then, stock and the limits gone, ours over gRPC;
then the same archive on Ray Serve in rounds of its own; then the report."""

from __future__ import annotations

import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Callable, Iterator

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


def _rounds(servers: dict, workload: str, body_files: list[Path], concurrencies: list[int], seconds: float,
            rounds: int, keep: Callable[[LoadRun], None]) -> Iterator[int]:
    """Warm each server up, then the rounds of cells, alternated (ABAB, then BABA: drift hits
    both); yields each round's number after its cells."""
    for path, (server, model) in servers.items():
        wrk_load(server, workload, path, model, body_files, max(concurrencies), WARM_UP_S, 0)
    for round_number in range(1, rounds + 1):
        order = list(servers) if round_number % 2 else list(reversed(servers))
        for concurrency in concurrencies:
            for path in order:
                server, model = servers[path]
                say(f"bench: {workload} round {round_number}/{rounds}: {path} REST c{concurrency}, {seconds:g} s")
                keep(wrk_load(server, workload, path, model, body_files, concurrency, seconds, round_number))
        yield round_number


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
                ours = stack.enter_context(running("ours", [workload.ours], CONFIG_FILE)), workload.ours.stem
                with ExitStack() as beside_stock:
                    servers = {"ours": ours}
                    if with_stock and workload.stock is not None:
                        servers["stock"] = (beside_stock.enter_context(running("stock", [workload.stock], stock_properties)),
                                            workload.stock.stem)
                    timer = None
                    if with_limit:
                        precision = ours[0].management(timeout=30).served_precision(ours[1])
                        say(f"bench: {workload.name}: building the limits' workers (serving in {precision}, "
                            "as our server chose)")
                        timer = beside_stock.enter_context(Limits(workload.name, workload.ours, workload.bodies, precision))
                    for round_number in _rounds(servers, workload.name, body_files, concurrencies, seconds, rounds, keep):
                        if timer is not None:
                            say(f"bench: {workload.name} round {round_number}/{rounds}: the limits (forward fp32, serving), "
                                "in this process")
                            limits += timer.measure(round_number)
                if grpc_concurrencies:
                    with GrpcClient.from_key_file(ours[0].run_folder.key_file, inference_port=ours[0].ports.grpc_inference,
                                                  management_port=ours[0].ports.grpc_management, timeout=300) as grpc:
                        for concurrency in grpc_concurrencies:
                            say(f"bench: {workload.name}: ours gRPC c{concurrency}, {grpc_requests} requests")
                            keep(grpc_load(ours[0], grpc, workload.name, ours[1], workload.bodies, concurrency,
                                           grpc_requests))
                if with_ray:  # the same archive on Ray Serve (path "ray"), after stock and the limits are gone:
                    # an idle Ray node's processes beside them moved the limits by up to 47% between rounds
                    with running_on_ray([workload.ours], CONFIG_FILE) as ray:
                        for _ in _rounds({"ray": (ray, workload.ours.stem)}, workload.name, body_files, concurrencies,
                                         seconds, rounds, keep):
                            pass
    text = report(cells, limits, out)
    print("\n" + text, flush=True)
    say(f"bench: results in {out / 'results.md'}, chart {out / 'throughput.png'}")
    return text
