"""Where and how the forward runs: the device, reduced precision behind an accuracy guard, and
torch.compile with a deadline and an eager fallback. Used by ``handlers.lifecycle.Worker``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

GUARD_AGREEMENT = 0.99  # reduced-precision top-1 must match fp32 on at least this share of check outputs
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def precision_mode(precision: str, device: torch.device, fast_math: bool):
    """The context a forward runs in for ``precision``."""
    if fast_math:
        # oneDNN runs this whole process's fp32 GEMMs and convolutions in bf16 (set at launch;
        # it cannot change once torch has started): bf16 is the default path, and fp32 means
        # keeping oneDNN out (exact fp32, slower convolutions).
        return contextlib.nullcontext() if precision == "bf16" else torch.backends.mkldnn.flags(enabled=False)
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def guarded_precision(candidate: str, forward: Callable[[str], list]) -> tuple[str, str]:
    """``candidate`` if the model's check inputs keep their fp32 top-1 under it, else "fp32";
    and why. ``forward(precision)`` returns the check inputs' outputs (None: there are none)."""
    reference = forward("fp32")
    if not reference:
        return "fp32", f"{candidate} refused: the model has no check inputs for the accuracy guard"
    agree = total = 0
    for expected, got in zip(reference, forward(candidate)):
        for a, b in zip(_tensors(expected), _tensors(got)):
            same = a.argmax(-1) == b.argmax(-1)
            agree, total = agree + int(same.sum()), total + same.numel()
    share = agree / max(1, total)
    if share >= GUARD_AGREEMENT:
        return candidate, f"accuracy guard passed: {candidate} top-1 agrees with fp32 on {share:.1%} of {total} check outputs"
    return "fp32", f"accuracy guard failed: {candidate} top-1 agrees with fp32 on only {share:.1%} of {total}; using fp32"


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


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [tensor for value in output for tensor in _tensors(value)]
    if isinstance(output, dict):
        return [tensor for value in output.values() for tensor in _tensors(value)]
    return []


def to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        if device.type == "cuda" and value.device.type == "cpu":
            # Page-locked memory lets the copy run asynchronously (non_blocking needs it).
            return value.pin_memory().to(device, non_blocking=True)
        return value.to(device, non_blocking=device.type == "cuda")
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value
