"""Stopping processes we started, by their own PIDs (never by name)."""

from __future__ import annotations

import signal

import psutil


def stop_processes(processes: list[psutil.Process], signum: int = signal.SIGTERM, timeout: float = 60.0) -> None:
    """Send ``signum`` to the first process (the parent: it stops its children), wait up to
    ``timeout`` seconds for all of them to exit, then kill those left and reap them."""
    if not processes:
        return
    processes[0].send_signal(signum)
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        process.kill()
    psutil.wait_procs(alive, timeout=10)
