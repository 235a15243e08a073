"""Where and how the forward runs: the device, reduced precision (bf16/fp16 by autocast or oneDNN
fast math, int8 by dynamic quantization) behind accuracy guards, and
torch.compile with a deadline and an eager fallback. Used by ``handlers.lifecycle.Worker``.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import warnings
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

GUARD_AGREEMENT = 0.99  # reduced-precision top-1 must match fp32 on at least this share of check outputs
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# oneDNN fast math through torch's switches (torch >= 2.9, torch.backends.mkldnn.<op>.fp32_precision):
# fp32 matmuls (nn.Linear, matmul, bmm, attention's products) and convolutions computed by oneDNN
# with bf16 inputs and fp32 accumulation (ACL's bf16 kernels on Arm); the model stays fp32.
FAST_MATH_OPS = ("matmul", "conv")
FAST_MATH_SWITCHES = "switches"  # Tuning.fast_math: torch's per-op switches, on during each forward
FAST_MATH_ENVIRONMENT = "environment"  # Tuning.fast_math: DNNL_DEFAULT_FPMATH_MODE, for the whole process


def has_fast_math_switches() -> bool:
    """torch has the per-op precision switches (2.9 on); older releases have only the variable."""
    return all(hasattr(getattr(torch.backends.mkldnn, op, None), "fp32_precision") for op in FAST_MATH_OPS)


@contextlib.contextmanager
def mkldnn_bf16():
    """For the block: oneDNN computes fp32 matmuls and convolutions in bf16; restored after.
    The switches are read by every operation, so this works at any time in the process (shown
    under emulation by tests/test_aarch64.py), unlike DNNL_DEFAULT_FPMATH_MODE."""
    switches = [getattr(torch.backends.mkldnn, op) for op in FAST_MATH_OPS]
    saved = [switch.fp32_precision for switch in switches]
    try:
        for switch in switches:
            switch.fp32_precision = "bf16"
        yield
    finally:
        for switch, value in zip(switches, saved):
            switch.fp32_precision = value


@contextlib.contextmanager
def without_onednn():
    """For the block: torch keeps oneDNN out (its own or the BLAS kernels run); restored after.
    (torch.backends.mkldnn.flags would also touch the legacy TF32 switch.)"""
    saved = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = saved


def fast_math_read_back() -> str:
    """What torch reports inside ``mkldnn_bf16``, e.g. "matmul=bf16 conv=bf16" (for the tuning line)."""
    with mkldnn_bf16():
        return " ".join(f"{op}={getattr(torch.backends.mkldnn, op).fp32_precision}" for op in FAST_MATH_OPS)


def precision_mode(precision: str, device: torch.device, fast_math: str = "", fpmath_env: bool = False):
    """The context a forward runs in for ``precision``. ``fast_math``: how bf16 runs on this CPU
    (FAST_MATH_SWITCHES, FAST_MATH_ENVIRONMENT, or "" for autocast); ``fpmath_env``: the operator
    set oneDNN's default math to bf16 for the whole process."""
    if precision == "fp32":
        # Exact fp32. Under a process-wide bf16 default that means keeping oneDNN out (slower convolutions).
        return without_onednn() if fpmath_env else contextlib.nullcontext()
    if precision == "bf16" and fast_math == FAST_MATH_SWITCHES:
        return mkldnn_bf16()
    if precision == "int8" or (precision == "bf16" and fast_math == FAST_MATH_ENVIRONMENT):
        return contextlib.nullcontext()  # int8: the quantized model itself
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def accuracy_guard(candidate: str, reference: list, outputs: list) -> tuple[bool, str]:
    """Whether ``outputs`` (the check inputs under ``candidate``) keep the fp32 ``reference``'s
    top-1 on at least GUARD_AGREEMENT of the outputs; and the words for the log line."""
    agree = total = 0
    for expected, got in zip(reference, outputs):
        for a, b in zip(_tensors(expected), _tensors(got)):
            same = a.argmax(-1) == b.argmax(-1)
            agree, total = agree + int(same.sum()), total + same.numel()
    share = agree / max(1, total)
    if share >= GUARD_AGREEMENT:
        return True, f"accuracy guard passed: {candidate} top-1 agrees with fp32 on {share:.1%} of {total} check outputs"
    return False, f"accuracy guard failed: {candidate} top-1 agrees with fp32 on only {share:.1%} of {total}"


# -- int8: dynamic quantization of the Linear layers (CPU) --------------------------------------------

INT8_MAX_POINTS_LOST = 1.0  # held-out accuracy through int8 may be at most this many points under fp32
# The accuracies are stored to 4 decimals, so a loss is a multiple of 0.01 points; float arithmetic
# on them is off by ~1e-14 (100 * (0.7547 - 0.7447) = 1.0000000000000009): compare with this margin.
POINTS_MARGIN = 1e-6
INT8_METADATA_KEY = "int8"  # metadata.json: {"metric", "fp32", "int8", "examples", "engine"}, measured at build


def int8_engine(is_arm: bool) -> str | None:
    """The quantized engine for dynamic int8 here, or None. x86: "x86" (torch's default there:
    fbgemm's kernels and oneDNN's). aarch64: "qnnpack". Not "onednn" (Arm Compute Library's
    int8 GEMMs, pytorch/pytorch#126687 and #148585, faster by their figures): on torch 2.14.1's
    aarch64 wheel under qemu (Neoverse-V1 and -N1 alike) it answered right only for the first
    input shape it saw and wrong for every other (a BERT's "positive" 0.76 became "negative"
    0.94), while qnnpack matched fp32 on every shape. Whether real Graviton hardware does the
    same was not tried; the guard runs the check inputs as one batch and one by one either way.
    torch's aarch64 default is "x86", which there is the same path as "onednn"."""
    preferred = ("qnnpack", "onednn") if is_arm else ("x86", "fbgemm", "onednn")
    supported = torch.backends.quantized.supported_engines
    return next((engine for engine in preferred if engine in supported), None)


def int8_model(model: torch.nn.Module, engine: str) -> torch.nn.Module:
    """A copy of ``model`` whose nn.Linear layers hold int8 weights, one scale per output channel,
    and quantize their input per batch (``torch.ao.quantization.quantize_dynamic``); the rest stays
    fp32. Per channel, not per tensor: on the demo's held-out tweets bert_fill_mask's top-1 stayed
    0.165 (per tensor: 0.143) and roberta_sentiment lost 1.1 points (per tensor: 2.1). Sets the
    process's quantized engine (a worker serves one model)."""
    torch.backends.quantized.engine = engine
    spec = {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
    with warnings.catch_warnings():
        # torch 2.14 says torch.ao.quantization moves to torchao; this eager API still ships in torch.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)


def int8_held_out(metadata: dict) -> tuple[bool | None, str]:
    """The second int8 guard, from the archive's metadata (measured when it was built): True if
    int8 lost at most INT8_MAX_POINTS_LOST points of held-out accuracy, False if more, None if
    the archive has no such measurement; and the words for the log line."""
    measured = metadata.get(INT8_METADATA_KEY)
    if not isinstance(measured, dict) or not {"fp32", "int8"} <= measured.keys():
        return None, "no held-out int8 accuracy in the archive's metadata"
    lost = 100 * (measured["fp32"] - measured["int8"])
    words = (f"held-out {measured.get('metric', 'accuracy')}: int8 {measured['int8']:.4f}, fp32 {measured['fp32']:.4f} "
             f"on {measured.get('examples', '?')} examples ({-lost:+.2f} points)")
    if lost <= INT8_MAX_POINTS_LOST + POINTS_MARGIN:
        return True, words
    return False, f"{words}, more than {INT8_MAX_POINTS_LOST:g} lost"


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
