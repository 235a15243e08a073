"""Worker-init tuning, run once per worker by the handler core, logged as one line.

Decides, from what the kernel reports rather than from guesses:
- cores: with ``handler.cores: N`` the worker claims N of the CPUs it may use for itself, by
  holding a lock file per CPU (``GS_CORE_LOCK_DIR``, one folder per server). The kernel drops a
  dead worker's locks, so the worker TorchServe starts in its place claims the freed cores and
  the sets stay disjoint. With ``shared`` (the default) no core is claimed and the model's
  workers split the CPUs between them;
- threads: the claimed cores, or the CPUs this process may use (its affinity, narrowed by a
  cgroup CPU quota: a container limited to 2 CPUs on a 64-core host gets 2) divided by the
  model's worker count; OMP_NUM_THREADS overrides. Inter-op threads: 1;
- precision: on the CPU, bf16 only where it is native (x86 ``avx512_bf16``/``amx_bf16`` flags in
  /proc/cpuinfo; aarch64 HWCAP2_BF16 from getauxval, since under qemu-user /proc/cpuinfo shows
  the host). How: on Arm, oneDNN fast math through torch's per-op switches, on during each
  forward of this model only (the model stays fp32; matmuls and convolutions run in bf16 on
  ACL), read back from torch for the log line; on a torch without the switches (before 2.9),
  DNNL_DEFAULT_FPMATH_MODE if the operator set it; else autocast. On CUDA, fp16 before compute
  capability 8.0 (T4G on G5g is 7.5), bf16 from 8.0. Either way the core then checks that the
  model's own check inputs keep their top-1;
- launch settings that must be in place before torch starts (the allocator, oneDNN's primitive
  cache) are set by the launch path; the worker reports what it found.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from handlers import acceleration
from handlers.cpu_features import CpuFeatures, read_text
from handlers.launch import CORE_LOCK_DIR_VAR, FAST_MATH_VAR, launch_settings

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
ONEDNN_KEPT_OUT = f"oneDNN kept out: {FAST_MATH_VAR} makes bf16 its default in this process"  # fp32 under it


def cgroup_cpu_limit(cgroup_root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs allowed by a cgroup quota (v2 cpu.max or v1 cfs quota/period), or None for no limit."""
    root = Path(cgroup_root)
    v2 = read_text(str(root / "cpu.max")).split()
    if len(v2) == 2 and v2[0] != "max":
        return int(v2[0]) / int(v2[1])
    quota = read_text(str(root / "cpu" / "cpu.cfs_quota_us")).strip() or read_text(str(root / "cpu.cfs_quota_us")).strip()
    period = read_text(str(root / "cpu" / "cpu.cfs_period_us")).strip() or read_text(str(root / "cpu.cfs_period_us")).strip()
    if quota.lstrip("-").isdigit() and period.isdigit() and int(quota) > 0:
        return int(quota) / int(period)
    return None


def allowed_cpus() -> list[int]:
    """The CPU ids this process may run on (its affinity)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def usable_cpus(affinity: int | None = None, quota: float | None = None) -> int:
    """How many CPUs this process may use: its affinity, narrowed by a cgroup quota (rounded up)."""
    if affinity is None:
        affinity = len(allowed_cpus())
    if quota is None:
        quota = cgroup_cpu_limit()
    limit = affinity if quota is None else min(affinity, max(1, math.ceil(quota)))
    return max(1, limit)


def parse_cores(value) -> int:
    """``handler.cores``: "shared" (0) or how many cores each worker claims for itself."""
    if value in ("shared", 0, "0"):
        return 0
    if isinstance(value, bool) or not str(value).isdigit():
        raise ValueError(f"expected 'shared' or a whole number of cores, got {value!r}")
    return int(value)


class CoreClaim:
    """Cores held by this worker for its lifetime: one exclusive lock file per CPU id.

    flock locks belong to the open file, so they vanish with the process: a killed worker's
    cores are free for the worker TorchServe starts in its place.
    """

    def __init__(self, cores: list[int], files: list):
        self.cores = cores
        self._files = files  # kept open: closing one would release its core

    @classmethod
    def take(cls, wanted: int, candidates: list[int], lock_dir: Path) -> "CoreClaim":
        lock_dir.mkdir(parents=True, exist_ok=True)
        cores, files = [], []
        for cpu in candidates:
            if len(cores) == wanted:
                break
            handle = open(lock_dir / f"cpu{cpu}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            cores.append(cpu)
            files.append(handle)
        return cls(cores, files)

    def release(self) -> None:
        for handle in self._files:
            handle.close()
        self._files, self.cores = [], []


def core_lock_dir(environ: dict[str, str] | None = None) -> Path:
    """Where the workers of one server keep their core locks (the launch path sets it per server)."""
    environ = os.environ if environ is None else environ
    return Path(environ.get(CORE_LOCK_DIR_VAR) or Path(tempfile.gettempdir()) / f"graviton-serve-cores-{os.getuid()}")


def pin_process(cores: list[int]) -> None:
    """Pin every thread of this process (the affinity call is per thread on Linux)."""
    for task in Path("/proc/self/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cores)
        except OSError:  # a thread that has just exited
            pass


def decide_threads(environ: dict[str, str] | None = None, cpus: int | None = None, workers: int = 1) -> tuple[int, str]:
    """Intra-op threads: OMP_NUM_THREADS if set, else this worker's share of the usable CPUs."""
    environ = os.environ if environ is None else environ
    from_env = environ.get("OMP_NUM_THREADS", "").strip()
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env), "OMP_NUM_THREADS"
    cpus = usable_cpus() if cpus is None else cpus
    if workers > 1:
        return max(1, cpus // workers), f"{cpus} usable CPUs (affinity and cgroup quota) shared by {workers} workers"
    return cpus, f"{cpus} usable CPUs (affinity and cgroup quota)"


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
    if acceleration.has_fast_math_switches() if switches is None else switches:
        read_back = acceleration.fast_math_read_back()
        if all(part.endswith("=bf16") for part in read_back.split()):
            return acceleration.FAST_MATH_SWITCHES, f"oneDNN fast math (torch.backends.mkldnn {read_back} in each forward, read back)"
        return "", f"autocast (torch's fast-math switches read back {read_back})"
    if fpmath_env_on(environ):
        return acceleration.FAST_MATH_ENVIRONMENT, f"oneDNN fast math ({FAST_MATH_VAR} set at launch)"
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


def launch_env_report(environ: dict[str, str] | None = None, features: CpuFeatures | None = None) -> str:
    environ = os.environ if environ is None else environ
    expected = launch_settings(features)
    # Also what an operator may set beyond ours (THP on x86, oneDNN's default math): reported, not required.
    reported = dict.fromkeys((*expected, "THP_MEM_ALLOC_ENABLE", FAST_MATH_VAR))
    found = [f"{key}={environ[key]}" for key in reported if key in environ]
    missing = [key for key in expected if key not in environ]
    return "launch env " + (" ".join(found) or "none") + (f" (not set: {', '.join(missing)})" if missing else "")


@dataclass
class Tuning:
    threads: int
    requested: str  # handler.precision
    candidates: tuple[str, ...]  # the precisions to try beside fp32 (decide_precision)
    claim: CoreClaim | None  # held for the worker's lifetime: its locks are its cores
    fast_math: str  # how bf16 runs on this CPU: acceleration.FAST_MATH_SWITCHES / _ENVIRONMENT, "" (autocast)
    fpmath_env: bool  # the operator made bf16 oneDNN's default for the whole process
    int8_engine: str | None  # the quantized engine for int8, where the model family offers it
    precision_reason: str  # why these candidates (the tuning line's words)
    cpu: str  # the CPU's model and kernel-relevant features (CpuFeatures.identity): part of auto's cache key


def configure(model_name: str, device: torch.device, requested_precision: str, cores_wanted: int = 0,
              workers: int = 1, offers_int8: bool = False) -> Tuning:
    """Claim cores, set torch's threads once and decide the precision; log it all as one line."""
    claim = None
    if cores_wanted and device.type == "cpu":
        allowed = allowed_cpus()
        usable = allowed[: usable_cpus(affinity=len(allowed))]
        claim = CoreClaim.take(cores_wanted, usable, core_lock_dir())
        if claim.cores:
            pin_process(claim.cores)
            threads, thread_reason = decide_threads(cpus=len(claim.cores))
            thread_reason = (f"pinned to cores {claim.cores}" + ("" if len(claim.cores) == cores_wanted
                             else f", {cores_wanted} asked but only {len(claim.cores)} free") + f"; threads from {thread_reason}")
        else:
            threads, thread_reason = decide_threads(workers=workers)
            thread_reason = f"no free core of {usable} to claim, sharing; threads from {thread_reason}"
    else:
        threads, thread_reason = decide_threads(workers=workers)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
        interop = "inter-op 1"
    except RuntimeError:  # the inter-op pool already started: too late to size it
        interop = f"inter-op {torch.get_num_interop_threads()} (already started)"
    features = CpuFeatures.detect()
    fast_math, how = fast_math_mode(device, features)
    # The variable changes oneDNN's math only where bf16 is native; elsewhere oneDNN stays fp32 anyway.
    fpmath_env = fpmath_env_on() and device.type == "cpu" and features.bf16
    engine = acceleration.int8_engine(features.is_arm) if offers_int8 and device.type == "cpu" else None
    candidates, precision_reason = decide_precision(requested_precision, device, features, cuda_capability(device),
                                                    how, fpmath_env, engine)
    if not candidates:
        precision = "fp32"
    elif requested_precision == "auto":
        precision = f"auto of fp32, {', '.join(candidates)}"
        precision_reason += "; each timed on the check inputs if its guards pass, or auto's cached outcome (next line)"
    else:
        precision = candidates[0]
        precision_reason += ", if the accuracy guard passes (next line)"
    reason = (f"threads={threads} {interop} ({thread_reason}); precision={precision} ({precision_reason}); "
              f"{launch_env_report(features=features)}")
    log.info("%s: tuning: device=%s %s", model_name, device, reason)
    return Tuning(threads, requested_precision, candidates, claim, fast_math, fpmath_env, engine, precision_reason,
                  features.identity)
