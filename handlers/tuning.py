"""Worker-init tuning, run once per worker by the handler core, logged as one line.

Decides, from what the kernel reports rather than from guesses:
- threads: the CPUs this process may use (its affinity, narrowed by a cgroup CPU quota: a
  container limited to 2 CPUs on a 64-core host gets 2 threads), unless OMP_NUM_THREADS says;
- precision: bf16 only where the CPU has native bf16 (x86 ``avx512_bf16``/``amx_bf16`` flags in
  /proc/cpuinfo; aarch64 HWCAP2_BF16 from getauxval, since under qemu-user /proc/cpuinfo shows
  the host), and only if the model's own check inputs give the same top-1 in bf16 as in fp32
  (the core runs that guard).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
AT_HWCAP2 = 26
HWCAP2_BF16 = 1 << 14
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuFeatures:
    machine: str  # "x86_64", "aarch64", ...
    bf16: bool
    evidence: str  # what the decision rests on, for the log line

    @classmethod
    def detect(cls) -> "CpuFeatures":
        machine = platform.machine().lower()
        if machine in ("aarch64", "arm64"):
            return cls.from_hwcap2(machine, _getauxval(AT_HWCAP2))
        return cls.from_cpuinfo(machine, _read("/proc/cpuinfo"))

    @classmethod
    def from_hwcap2(cls, machine: str, hwcap2: int | None) -> "CpuFeatures":
        if hwcap2 is None:
            return cls(machine, False, "getauxval(AT_HWCAP2) unavailable")
        has = bool(hwcap2 & HWCAP2_BF16)
        return cls(machine, has, f"HWCAP2_BF16 {'set' if has else 'clear'}")

    @classmethod
    def from_cpuinfo(cls, machine: str, cpuinfo: str) -> "CpuFeatures":
        flags: set[str] = set()
        for line in cpuinfo.splitlines():
            if line.startswith("flags"):
                flags = set(line.partition(":")[2].split())
                break
        found = [flag for flag in X86_BF16_FLAGS if flag in flags]
        return cls(machine, bool(found), f"cpuinfo flags: {', '.join(found) or 'no avx512_bf16/amx_bf16'}")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _getauxval(kind: int) -> int | None:
    try:
        libc = ctypes.CDLL(None)
        libc.getauxval.restype = ctypes.c_ulong
        libc.getauxval.argtypes = [ctypes.c_ulong]
        return int(libc.getauxval(kind))
    except (OSError, AttributeError):
        return None


def cgroup_cpu_limit(cgroup_root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs allowed by a cgroup quota (v2 cpu.max or v1 cfs quota/period), or None for no limit."""
    root = Path(cgroup_root)
    v2 = _read(str(root / "cpu.max")).split()
    if len(v2) == 2 and v2[0] != "max":
        return int(v2[0]) / int(v2[1])
    quota = _read(str(root / "cpu" / "cpu.cfs_quota_us")).strip() or _read(str(root / "cpu.cfs_quota_us")).strip()
    period = _read(str(root / "cpu" / "cpu.cfs_period_us")).strip() or _read(str(root / "cpu.cfs_period_us")).strip()
    if quota.lstrip("-").isdigit() and period.isdigit() and int(quota) > 0:
        return int(quota) / int(period)
    return None


def usable_cpus(affinity: int | None = None, quota: float | None = None) -> int:
    """CPUs this process may use: its affinity, narrowed by a cgroup quota (rounded up)."""
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            affinity = os.cpu_count() or 1
    if quota is None:
        quota = cgroup_cpu_limit()
    limit = affinity if quota is None else min(affinity, max(1, math.ceil(quota)))
    return max(1, limit)


def decide_threads(environ: dict[str, str] | None = None, cpus: int | None = None) -> tuple[int, str]:
    environ = os.environ if environ is None else environ
    from_env = environ.get("OMP_NUM_THREADS", "").strip()
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env), "OMP_NUM_THREADS"
    return (cpus if cpus is not None else usable_cpus()), "CPUs this process may use (affinity and cgroup quota)"


def decide_precision(requested: str, device: torch.device, features: CpuFeatures) -> tuple[str, str]:
    """fp32 or bf16, and why. bf16 still has to pass the core's accuracy guard."""
    if requested == "fp32":
        return "fp32", "model-config asks for fp32"
    if device.type != "cpu":
        return "fp32", f"{device.type}: CPU precision rules do not apply"
    if requested == "bf16":
        return "bf16", "model-config asks for bf16" + ("" if features.bf16 else f" (no native bf16: {features.evidence})")
    if features.bf16:
        return "bf16", f"native bf16 ({features.evidence})"
    return "fp32", f"no native bf16 ({features.evidence})"


@dataclass(frozen=True)
class Tuning:
    threads: int
    precision: str
    reason: str


def configure(model_name: str, device: torch.device, requested_precision: str) -> Tuning:
    """Set torch's threads once and decide the precision; log the decision and its reasons."""
    threads, thread_reason = decide_threads()
    torch.set_num_threads(threads)
    precision, precision_reason = decide_precision(requested_precision, device, CpuFeatures.detect())
    reason = f"threads={threads} (from {thread_reason}); precision={precision} ({precision_reason})"
    log.info("%s: tuning: device=%s %s", model_name, device, reason)
    return Tuning(threads, precision, reason)
