"""Holding a TorchServe in the foreground until SIGTERM drains and stops it (the container's main
and ``scripts/serve --foreground``): the one place that uses both the server and its draining."""

from __future__ import annotations

import signal
import threading
from typing import Callable

from graviton_serve.drain import DRAIN_TIMEOUT_S, drain
from graviton_serve.progress import say
from graviton_serve.server import READY_TIMEOUT_S, StartCancelled, TorchServe


def serve_foreground(server: TorchServe, drain_timeout_s: int = DRAIN_TIMEOUT_S,
                     ready_timeout_s: int = READY_TIMEOUT_S, on_ready: Callable[[], None] | None = None,
                     stop_when: Callable[[], int | None] | None = None) -> int:
    """Start ``server`` in the foreground and hold it until SIGTERM/SIGINT (then drain for up to
    ``drain_timeout_s`` seconds and stop) or until TorchServe exits on its own; returns the status
    to exit with. ``on_ready`` runs once every model is READY; ``stop_when`` (a process beside
    TorchServe: its exit status, None while it runs) is asked twice a second, and an exit drains
    and stops as a signal does. Raises ServerError (and what ``TorchServe.start`` raises) when the
    start fails."""
    draining = server.run_folder.draining
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
    why = "signal received"
    while launcher.poll() is None and not stop.wait(0.5):
        if stop_when and (exited := stop_when()) is not None:
            why = f"the process beside TorchServe exited with status {exited}"
            stop.set()
    if not stop.is_set():
        status = launcher.returncode
        say(f"TorchServe exited on its own with status {status}")
        server.stop()  # its HTTP front
        return status if status else 1
    draining.touch()
    say(f"{why}: draining (up to {drain_timeout_s}s)")
    left = drain(server, drain_timeout_s)
    say("drained: every request answered" if left == 0 else f"drain timeout: {left} requests still in flight")
    server.stop()
    status = launcher.wait(timeout=60)
    say(f"TorchServe stopped, status {status}")
    return status
