"""How a forward runs in each precision: bf16/fp16 by autocast or by oneDNN fast math, fp32
exactly, int8 as a dynamically quantized copy of the model. Which precision a worker uses, and
why, is ``handlers.precision``'s decision; this module only carries it out.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# oneDNN fast math through torch's switches (torch >= 2.9, torch.backends.mkldnn.<op>.fp32_precision):
# fp32 matmuls (nn.Linear, matmul, bmm, attention's products) and convolutions computed by oneDNN
# with bf16 inputs and fp32 accumulation (ACL's bf16 kernels on Arm); the model stays fp32.
FAST_MATH_OPS = ("matmul", "conv")
FAST_MATH_SWITCHES = "switches"  # PrecisionPlan.fast_math: torch's per-op switches, on during each forward
FAST_MATH_ENVIRONMENT = "environment"  # PrecisionPlan.fast_math: DNNL_DEFAULT_FPMATH_MODE, for the whole process


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



# -- int8: dynamic quantization of the Linear layers (CPU) --------------------------------------------

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
    and quantize their input by the range of the whole tensor they are given
    (``torch.ao.quantization.quantize_dynamic``; so the worker runs each item alone); the rest stays
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
