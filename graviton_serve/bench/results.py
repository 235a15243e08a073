"""What the bench measures: a workload, one load run (a cell of the table), the limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workload:
    name: str
    ours: Path  # our archive
    bodies: list[bytes]
    stock: Path | None = None  # the stock reference archive, where there is one


@dataclass
class LoadRun:
    """One load run: a workload on one path, protocol and concurrency, in one round."""

    workload: str
    path: str  # "ours" or "stock"
    protocol: str  # "REST" (wrk) or "gRPC" (Python client)
    concurrency: int
    round: int  # 1, 2, ...: ours and stock alternate within a round
    requests: int  # completed
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    errors: int  # non-2xx answers, connection errors and timeouts
    cpu_s_per_request: float  # the model's worker processes
    rss_mib: int
    client_cpu_share: float  # the load client's CPU time over the cell's wall time (1.0 = one core)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds


@dataclass
class Limit:
    """One process, no server, our handler on one full batch of the bench's bodies."""

    workload: str
    kind: str  # "forward (fp32)": collate + forward in fp32; "serving": decode + collate + forward + encode, as served
    batch: int
    threads: int
    precision: str
    items_per_s: float
    batch_ms: float
