"""Draining a TorchServe, and holding one in the foreground until SIGTERM drains and stops it (the
container's main and ``scripts/serve --foreground``).

In flight = requests queued in the frontend (each model's pendingRequests, from the management
API) plus batches inside workers: the server hands its workers a busy folder (GS_BUSY_DIR), where
the handler side keeps a file named by the worker's PID while a batch runs. TorchServe alone would
drop what is in flight: its frontend closes their connections on SIGTERM.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import psutil

from graviton_serve.management import CALL_ERRORS
from graviton_serve.progress import say

if TYPE_CHECKING:
    from graviton_serve.server import TorchServe

DRAINING_FILE = "draining"  # in the run folder while draining: the readiness probe fails


def busy_dir(run_dir: Path) -> Path:
    """The folder a server hands its workers as GS_BUSY_DIR."""
    return run_dir / "busy"


def busy_workers(folder: Path) -> int:
    """Workers inside a batch now: busy files whose PID is alive."""
    return sum(1 for marker in folder.glob("*") if psutil.pid_exists(int(marker.name)))


def in_flight(server: TorchServe) -> int:
    """Requests ``server`` holds now: queued in the frontend plus batches inside workers."""
    client = server.management()
    queued = 0
    for name in server.expected_models():
        try:
            queued += client.pending_requests(name)
        except CALL_ERRORS:
            pass
    return queued + busy_workers(server.busy_dir)


def drain(server: TorchServe, timeout: float, settle: float = 0.3) -> int:
    """Wait until nothing is in flight (seen twice, ``settle`` apart, to cover the hand-over
    from queue to worker) or ``timeout`` passes; returns what is left in flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if in_flight(server) == 0:
            time.sleep(settle)
            if in_flight(server) == 0:
                time.sleep(settle)  # the last responses leave the frontend
                return 0
        time.sleep(0.2)
    return in_flight(server)


def is_draining(run_dir: Path) -> bool:
    return (run_dir / DRAINING_FILE).exists()


def serve_foreground(server: TorchServe, drain_timeout_s: int = 30, ready_timeout_s: int = 600,
                     on_ready: Callable[[], None] | None = None) -> int:
    """Start ``server`` in the foreground and hold it until SIGTERM/SIGINT (then drain and stop)
    or until TorchServe exits on its own; returns the status to exit with."""
    from graviton_serve.server import StartCancelled  # here: server.py imports this module

    draining = server.run_dir / DRAINING_FILE
    stop = threading.Event()

    def on_signal(signum: int, _frame) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.run_dir.mkdir(parents=True, exist_ok=True)
    draining.unlink(missing_ok=True)
    say(f"starting TorchServe: models {', '.join(server.expected_models())}")
    try:
        # A signal during start-up stops TorchServe at once: nothing is served yet, nothing to drain.
        launcher = server.start(timeout=ready_timeout_s, foreground=True, cancel=stop)
    except StartCancelled as cancelled:
        say(f"signal received during start-up: TorchServe stopped ({cancelled})")
        return 0
    say("every model READY")
    if on_ready:
        on_ready()
    while launcher.poll() is None and not stop.wait(0.5):
        pass
    if not stop.is_set():
        status = launcher.returncode
        say(f"TorchServe exited on its own with status {status}")
        return status if status else 1
    draining.touch()
    say(f"signal received: draining (up to {drain_timeout_s}s)")
    left = drain(server, drain_timeout_s)
    say("drained: every request answered" if left == 0 else f"drain timeout: {left} requests still in flight")
    server.stop()
    status = launcher.wait(timeout=60)
    say(f"TorchServe stopped, status {status}")
    return status
