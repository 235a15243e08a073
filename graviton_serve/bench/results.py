"""What the bench measures: a workload, one load run (a cell of the table), one raw-forward limit."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Workload:
    name: str
    ours: Path  # our archive
    bodies: list[bytes]
    stock: Path | None = None  # the stock reference archive, where there is one


@dataclass
class LoadRun:
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


@dataclass
class RawForward:
    workload: str
    batch: int
    threads: int
    precision: str
    items_per_s: float
    forward_ms: float
