"""Which precision a worker runs in, and why: the one owner of that decision.

At start, ``plan`` lists the precisions to try beside fp32 and how bf16 would run here:
- on the CPU, bf16 only where it is native (x86 ``avx512_bf16``/``amx_bf16`` flags in
  /proc/cpuinfo; aarch64 HWCAP2_BF16 from getauxval, since under qemu-user /proc/cpuinfo shows
  the host). How: on Arm, oneDNN fast math through torch's per-op switches, on during each
  forward of this model only (the model stays fp32; matmuls and convolutions run in bf16 on
  ACL), read back from torch for the log line; on a torch without the switches (before 2.9),
  DNNL_DEFAULT_FPMATH_MODE if the operator set it; else autocast. int8 (dynamic quantization of
  nn.Linear) where the family's handler offers it (``ModelHandler.offers_int8``);
- on CUDA, fp16 before compute capability 8.0 (T4G on G5g is 7.5), bf16 from 8.0.
Once the model is loaded, ``choose`` runs the guards and returns a ``Choice``: every candidate
must keep the fp32 top-1 of the model's check inputs, as one batch and one by one; int8 must
also not have lost held-out accuracy when the archive was built (its metadata). A precision
asked for is used if it passed; ``auto`` keeps the fastest that passed, timed by
``handlers.auto_precision``. How each precision runs is ``handlers.precision_modes``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from handlers import auto_precision, precision_modes
from handlers.cpu_features import CpuFeatures
from handlers.launch import FAST_MATH_VAR

GUARD_AGREEMENT = 0.99  # reduced-precision top-1 must match fp32 on at least this share of check outputs
INT8_MAX_POINTS_LOST = 1.0  # held-out accuracy through int8 may be at most this many points under fp32
# The accuracies are stored to 4 decimals, so a loss is a multiple of 0.01 points; float arithmetic
# on them is off by ~1e-14 (100 * (0.7547 - 0.7447) = 1.0000000000000009): compare with this margin.
POINTS_MARGIN = 1e-6
INT8_METADATA_KEY = "int8"  # metadata.json: {"metric", "fp32", "int8", "examples", "engine"}, measured at build
ONEDNN_KEPT_OUT = f"oneDNN kept out: {FAST_MATH_VAR} makes bf16 its default in this process"  # fp32 under it


@dataclass(frozen=True)
class PrecisionPlan:
    """What a worker will try beside fp32, and how a reduced precision runs here."""

    requested: str  # handler.precision
    candidates: tuple[str, ...]  # the precisions to try beside fp32 (decide_precision)
    fast_math: str  # how bf16 runs on this CPU: precision_modes.FAST_MATH_SWITCHES / _ENVIRONMENT, "" (autocast)
    fpmath_env: bool  # the operator made bf16 oneDNN's default for the whole process
    int8_engine: str | None  # the quantized engine for int8, where the model family offers it
    reason: str  # why these candidates (the tuning line's words)
    words: str  # the tuning line's "precision=... (reason)"
    cpu: str  # the CPU's model and kernel-relevant features (CpuFeatures.identity): part of auto's cache key


@dataclass(frozen=True)
class Choice:
    precision: str  # fp32, bf16, fp16 or int8
    model: torch.nn.Module  # the module its forwards run (int8: the quantized copy)
    why: str  # the guards' and auto's words, for the tuning line and describe


def plan(requested: str, device: torch.device, family: str, offers_int8: bool,
         features: CpuFeatures | None = None) -> PrecisionPlan:
    """The candidates for ``handler.precision`` = ``requested`` on ``device`` for a model of
    ``family`` (its handler class's name). Raises ValueError, naming the key, for int8 asked of
    a family that does not offer it."""
    if requested == "int8" and not offers_int8:
        raise ValueError(f"model-config.yaml: 'handler.precision' is invalid: int8 is dynamic quantization of "
                         f"nn.Linear layers, offered by the families whose handler sets offers_int8, not by {family}")
    features = features or CpuFeatures.detect()
    fast_math, how = fast_math_mode(device, features)
    # The variable changes oneDNN's math only where bf16 is native; elsewhere oneDNN stays fp32 anyway.
    fpmath_env = fpmath_env_on() and device.type == "cpu" and features.bf16
    engine = precision_modes.int8_engine(features.is_arm) if offers_int8 and device.type == "cpu" else None
    candidates, reason = decide_precision(requested, device, features, cuda_capability(device), how, fpmath_env, engine)
    if not candidates:
        shown = "fp32"
    elif requested == "auto":
        shown = f"auto of fp32, {', '.join(candidates)}"
        reason += "; each timed on the check inputs if its guards pass, or auto's cached outcome (next line)"
    else:
        shown = candidates[0]
        reason += ", if the accuracy guard passes (next line)"
    return PrecisionPlan(requested, candidates, fast_math, fpmath_env, engine, reason, f"precision={shown} ({reason})",
                         features.identity)


# A forward of ``items`` through ``module`` in ``precision``: one output per item, on the CPU.
Run = Callable[[torch.nn.Module, list, str], list]


def choose(plan: PrecisionPlan, model: torch.nn.Module, check_items: list, run: Run, metadata: dict,
           auto: auto_precision.AutoStart) -> Choice:
    """The precision this worker serves in. Each candidate must keep the fp32 top-1 of the
    check items, run as one batch and one by one; int8 must also not have lost held-out
    accuracy at build (auto: a measurement must exist). Asked for one: it, if it passed. auto:
    fp32 and the passed ones timed on the check items, the fastest kept (``auto`` is the
    worker's ``auto_precision.AutoStart``: timed by a worker that starts alone, kept for later
    starts)."""
    choice = _choose(plan, model, check_items, run, metadata, auto)
    if choice.precision == "fp32" and plan.fpmath_env:
        return Choice("fp32", choice.model, f"{choice.why}; {ONEDNN_KEPT_OUT}")
    return choice


def _choose(plan: PrecisionPlan, model: torch.nn.Module, check_items: list, run: Run, metadata: dict,
            auto: auto_precision.AutoStart) -> Choice:
    if not check_items:
        return Choice("fp32", model, f"{', '.join(plan.candidates)} refused: the model has no check inputs for the accuracy guard")
    reference = run(model, check_items, "fp32")
    passed: dict[str, torch.nn.Module] = {"fp32": model}
    verdicts = []
    for precision in plan.candidates:
        module = model
        if precision == "int8":
            held_out, words = int8_held_out(metadata)
            if held_out is False or (held_out is None and plan.requested == "auto"):
                verdicts.append(f"int8 refused: {words}")
                continue
            verdicts.append(words if held_out else f"int8 unproven: {words}")
            module = precision_modes.int8_model(model, plan.int8_engine)
        # As one batch and one by one: a kernel may go wrong for a shape it did not see first
        # (torch 2.14's aarch64 int8 on the onednn engine did, under emulation).
        outputs = run(module, check_items, precision)
        alone = [output for item in check_items for output in run(module, [item], precision)]
        ok, words = accuracy_guard(precision, reference + reference, outputs + alone)
        verdicts.append(words)
        if ok:
            passed[precision] = module
    if len(passed) == 1:
        return Choice("fp32", model, "; ".join(verdicts) + "; using fp32")
    if plan.requested != "auto":
        ((precision, module),) = [(p, m) for p, m in passed.items() if p != "fp32"]
        return Choice(precision, module, "; ".join(reversed(verdicts)))  # the guard's verdict first
    outcome = auto.decide(list(passed), lambda: auto_precision.fastest(lambda p: run(passed[p], check_items, p), list(passed)))
    return Choice(outcome.precision, passed[outcome.precision], outcome.words(len(check_items)) + "; " + "; ".join(verdicts))


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


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def fpmath_env_on(environ: dict[str, str] | None = None) -> bool:
    """The operator made bf16 oneDNN's default math for this whole process (DNNL_DEFAULT_FPMATH_MODE
    BF16 or ANY, read by oneDNN when torch started)."""
    environ = os.environ if environ is None else environ
    return environ.get(FAST_MATH_VAR, "").upper() in ("BF16", "ANY")


def fast_math_mode(device: torch.device, features: CpuFeatures, environ: dict[str, str] | None = None,
                   switches: bool | None = None) -> tuple[str, str]:
    """How a bf16 forward runs here, and the words for the log line: oneDNN fast math on an Arm
    CPU with bf16, by torch's switches where torch has them (read back from torch, not assumed),
    else by DNNL_DEFAULT_FPMATH_MODE where the operator set it; "" (autocast) otherwise."""
    if device.type != "cpu" or not (features.is_arm and features.bf16):
        return "", "autocast"
    if precision_modes.has_fast_math_switches() if switches is None else switches:
        read_back = precision_modes.fast_math_read_back()
        if all(part.endswith("=bf16") for part in read_back.split()):
            return precision_modes.FAST_MATH_SWITCHES, f"oneDNN fast math (torch.backends.mkldnn {read_back} in each forward, read back)"
        return "", f"autocast (torch's fast-math switches read back {read_back})"
    if fpmath_env_on(environ):
        return precision_modes.FAST_MATH_ENVIRONMENT, f"oneDNN fast math ({FAST_MATH_VAR} set at launch)"
    return "", "autocast"


def decide_precision(requested: str, device: torch.device, features: CpuFeatures,
                     capability: tuple[int, int] | None = None, how: str = "autocast",
                     fpmath_env: bool = False, int8_engine: str | None = None) -> tuple[tuple[str, ...], str]:
    """The precisions to try beside fp32, and why. ``auto``: each that can pay here (the core
    keeps the fastest that passes its guards, by timing them); a precision asked for: that one,
    where it can run; ``fp32``: none. ``how`` a CPU runs bf16 (fast_math_mode's words);
    ``int8_engine``: the quantized engine, where the model family offers int8 (None: it does not)."""
    if requested == "fp32":
        return (), "model-config asks for fp32" + (f" ({ONEDNN_KEPT_OUT})" if fpmath_env else "")
    int8 = f"int8 (dynamic, {int8_engine} engine)"
    if device.type == "cuda":
        native = "bf16" if capability and capability >= (8, 0) else "fp16"
        where = f"CUDA compute capability {capability[0]}.{capability[1]}" if capability else "CUDA"
        if requested == "auto":
            return (native,), f"auto: {where}: {native} tensor cores"
        if requested == "int8":
            return (), "int8 is dynamic quantization for the CPU; CUDA runs fp32"
        if requested == "bf16" and native != "bf16":
            return ("fp16",), f"{where} has no bf16; fp16 instead"
        return (requested,), f"model-config asks for {requested}"
    if requested == "fp16":
        return (), "fp16 is for CUDA; the CPU runs fp32"
    if requested == "bf16":
        return ("bf16",), f"model-config asks for bf16, by {how}" + ("" if features.bf16 else f" (no native bf16: {features.evidence})")
    if requested == "int8":
        if int8_engine is None:
            return (), "int8 asked for, but torch has no quantized engine for this CPU"
        return ("int8",), f"model-config asks for {int8}"
    candidates, reasons = [], []
    if features.bf16:
        candidates.append("bf16")
        reasons.append(f"bf16: native ({features.evidence}), by {how}")
    else:
        reasons.append(f"no native bf16 ({features.evidence})")
    if int8_engine is not None:
        candidates.append("int8")
        reasons.append(int8)
    return tuple(candidates), "auto: " + "; ".join(reasons)


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [tensor for value in output for tensor in _tensors(value)]
    if isinstance(output, dict):
        return [tensor for value in output.values() for tensor in _tensors(value)]
    return []
