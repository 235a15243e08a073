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
class Stages:
    """Where the worker's time went during one cell, from our handlers' per-stage counters
    (handlers.torchserve_wire): batches, how full they were, and each stage's milliseconds per batch."""

    batches: int
    items_per_batch: float
    decode_ms: float
    forward_ms: float  # collate, forward, postprocess
    encode_ms: float
    in_handler: float  # share of the workers' wall time spent in our three stages (the rest: TorchServe's
    # worker protocol, and waiting for the frontend's next batch)


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
    frontend_cpu_s_per_request: float = 0.0  # TorchServe's Java frontend (0: not measured, e.g. Ray)
    stages: Stages | None = None  # our handlers' per-stage counters over the cell (ours on TorchServe only)

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
    batch_ms: float  # the median batch; items_per_s is batch / batch_ms
    round: int = 1  # measured in this round, right after its cells
    fastest_batch_ms: float | None = None  # the fastest of the same batches, for reference (the limit itself from 124721c to 4bcda4f)
