"""``handler.compile``: torch.compile at worker start, proven on the check inputs within a
deadline, and eager whenever compiling fails (at start or when a new shape recompiles).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


def compiled(model: torch.nn.Module, backend: str, timeout_s: int, warm_up: Callable[[torch.nn.Module], Any],
             model_name: str) -> torch.nn.Module:
    """``torch.compile(model)``, proven by ``warm_up(compiled)`` within ``timeout_s``; on any
    failure (no triton, no C++ compiler, a backend error, the deadline) the eager ``model``.

    Compiling happens at worker start, not on a user's first request, and a failure costs one
    warning line, never the worker.
    """
    runner = torch.compile(model, backend=backend)
    try:
        with _deadline(timeout_s):
            warm_up(runner)
    except BaseException as error:  # noqa: BLE001 - any failure to compile means eager
        if isinstance(error, KeyboardInterrupt):
            raise
        return eager(model, f"compile={backend} failed at init ({one_line(error)})", model_name)
    log.info("%s: tuning: compile=%s (warm-up on the check inputs passed)", model_name, backend)
    return runner


def eager(model: torch.nn.Module, why: str, model_name: str) -> torch.nn.Module:
    """Give up on the compiled form: reset dynamo's caches and run ``model`` eagerly from now on."""
    import torch._dynamo

    torch._dynamo.reset()
    log.warning("%s: tuning: %s; running eager", model_name, why)
    return model


def is_compile_error(error: BaseException) -> bool:
    return type(error).__module__.startswith(("torch._dynamo", "torch._inductor"))


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:240]}"


class _deadline:
    """Raise TimeoutError in this (main) thread after ``seconds``; elsewhere, no limit."""

    def __init__(self, seconds: int):
        self.seconds = seconds
        self.armed = threading.current_thread() is threading.main_thread()

    def _expired(self, signum, frame):
        raise TimeoutError(f"took longer than {self.seconds}s")

    def __enter__(self):
        if self.armed:
            self.previous = signal.signal(signal.SIGALRM, self._expired)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        return False
