"""Draining a TorchServe: waiting until every request it holds is answered.

In flight = requests queued in the frontend (each model's pendingRequests, from the management
API) plus batches inside workers: the server hands its workers a busy folder (GS_BUSY_DIR,
``RunFolder.busy``), where the handler side keeps a file named by the worker's PID while a batch
runs. TorchServe alone would drop what is in flight: its frontend closes their connections on
SIGTERM. Holding a server until SIGTERM, then draining it, is graviton_serve.foreground.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import psutil

from graviton_serve.management import CALL_ERRORS, ManagementClient
from graviton_serve.run_folder import RunFolder

# How long a SIGTERM waits for in-flight requests, in seconds (the container's GS_DRAIN_TIMEOUT_S
# default); a deployment's stop timeout must exceed it.
DRAIN_TIMEOUT_S = 30


class Drainable(Protocol):
    """What draining asks of a server (graviton_serve.server.TorchServe is one)."""

    run_folder: RunFolder

    def management(self) -> ManagementClient: ...

    def expected_models(self) -> list[str]: ...


def busy_workers(folder: Path) -> int:
    """Workers inside a batch now: busy files whose PID is alive."""
    return sum(1 for marker in folder.glob("*") if psutil.pid_exists(int(marker.name)))


def in_flight(server: Drainable) -> int:
    """Requests ``server`` holds now: queued in the frontend plus batches inside workers."""
    client = server.management()
    queued = 0
    for name in server.expected_models():
        try:
            queued += client.pending_requests(name)
        except CALL_ERRORS:
            pass
    return queued + busy_workers(server.run_folder.busy)


def drain(server: Drainable, timeout: float, settle: float = 0.3) -> int:
    """Wait until nothing is in flight (seen twice, ``settle`` seconds apart, to cover the hand-over
    from queue to worker) or ``timeout`` seconds pass; returns what is left in flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if in_flight(server) == 0:
            time.sleep(settle)
            if in_flight(server) == 0:
                time.sleep(settle)  # the last responses leave the frontend
                return 0
        time.sleep(0.2)
    return in_flight(server)


def is_draining(folder: RunFolder) -> bool:
    """Whether the server of ``folder`` is draining (its draining file is there)."""
    return folder.draining.exists()
