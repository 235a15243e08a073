"""What the CPU can do, from what the kernel reports rather than from guesses. No torch import:
the launch path reads this too, before any worker starts.

``GS_CPU_AS`` (one of ``AS_CPU``'s names) makes a process decide as another x86-64 CPU would:
the features the precision choice reads, and, for a process that starts with it set, the
kernel limits (``kernel_limits``) that make torch's libraries run that CPU's code paths (each
checked with its library's verbose log or timing on a Xeon with AMX: oneDNN's ISA, MKL's, ATen's
capability, fbgemm's). It can only lower what the host has: kernels never exceed the hardware
(acting as a wider CPU changes the decisions only; the kernels stay the host's).
``scripts/test`` runs the CPU-sensitive tests a second and third time this way.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass
from pathlib import Path

AT_HWCAP = 16
AT_HWCAP2 = 26
HWCAP2_BF16 = 1 << 14
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# The x86 flags that change which kernels torch runs (and so speed and the last bits of results).
X86_KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
ARM_MACHINES = ("aarch64", "arm64")  # what platform.machine() says on Linux and on macOS
CPU_AS_VAR = "GS_CPU_AS"


class CpuAsError(ValueError):
    """GS_CPU_AS names no CPU we can act as (the launch path and the worker both refuse it)."""


@dataclass(frozen=True)
class AsCpu:
    """An x86-64 CPU a process can act as: its flags, and the variables that cap torch's kernels."""

    description: str
    flags: tuple[str, ...]
    kernel_limits: dict  # read by each library when it loads: set before the process starts


AS_CPU = {
    "avx2": AsCpu("an AVX2 x86-64 CPU without AVX-512 (e.g. AMD EPYC Zen 2/3)", ("avx2", "fma"), {
        "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}),
    "avx512_bf16": AsCpu("an AVX-512 x86-64 CPU with avx512_bf16 and no AMX (e.g. AMD EPYC Zen 4)",
                         ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"), {
        "ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "MKL_ENABLE_INSTRUCTIONS": "AVX512"}),
    "amx": AsCpu("an x86-64 CPU with AMX (e.g. Intel Xeon Sapphire Rapids)",
                 ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8"), {}),
}


@dataclass(frozen=True)
class CpuFeatures:
    machine: str  # "x86_64", "aarch64", ...
    bf16: bool
    evidence: str  # what the decision rests on, for the log line
    identity: str = ""  # the CPU's model and the features that change kernels (for the precision cache's key)

    @property
    def is_arm(self) -> bool:
        return self.machine in ARM_MACHINES

    @classmethod
    def detect(cls, environ: dict[str, str] | None = None) -> "CpuFeatures":
        environ = os.environ if environ is None else environ
        machine = platform.machine().lower()
        if machine in ARM_MACHINES:
            # The hardware capability bits, not /proc/cpuinfo: under qemu-user that shows the host.
            return cls.from_hwcap2(machine, _getauxval(AT_HWCAP2), _getauxval(AT_HWCAP))
        found = cls.from_cpuinfo(machine, read_text("/proc/cpuinfo"))
        acting = environ.get(CPU_AS_VAR, "").strip()
        return found.acting_as(acting) if acting else found

    def acting_as(self, name: str) -> "CpuFeatures":
        """These features as ``AS_CPU[name]`` would report them (ValueError naming GS_CPU_AS for
        an unknown name)."""
        if name not in AS_CPU:
            raise CpuAsError(f"{CPU_AS_VAR}={name!r} is not a CPU to act as; expected one of {', '.join(AS_CPU)}")
        profile = AS_CPU[name]
        found = [flag for flag in X86_BF16_FLAGS if flag in profile.flags]
        return CpuFeatures("x86_64", bool(found),
                           f"{CPU_AS_VAR}={name}, as {profile.description}: {', '.join(found) or 'no avx512_bf16/amx_bf16'}",
                           f"x86_64 as {name} ({' '.join(profile.flags)}) on {self.identity}")

    @classmethod
    def from_hwcap2(cls, machine: str, hwcap2: int | None, hwcap: int | None = None) -> "CpuFeatures":
        if hwcap2 is None:
            return cls(machine, False, "getauxval(AT_HWCAP2) unavailable", f"{machine} hwcap unknown")
        has = bool(hwcap2 & HWCAP2_BF16)
        return cls(machine, has, f"HWCAP2_BF16 {'set' if has else 'clear'}",
                   f"{machine} hwcap {hwcap or 0:#x} hwcap2 {hwcap2:#x}")

    @classmethod
    def from_cpuinfo(cls, machine: str, cpuinfo: str) -> "CpuFeatures":
        flags = cpuinfo_flags(cpuinfo)
        model = cpuinfo_field(cpuinfo, "model name") or "unknown model"
        found = [flag for flag in X86_BF16_FLAGS if flag in flags]
        kernel_flags = " ".join(flag for flag in X86_KERNEL_FLAGS if flag in flags) or "none of the kernel flags"
        return cls(machine, bool(found), f"cpuinfo flags: {', '.join(found) or 'no avx512_bf16/amx_bf16'}",
                   f"{machine} {model} ({kernel_flags})")


ATEN_VAR = "ATEN_CPU_CAPABILITY"
# The cpuinfo flags ATen requires of each capability (at::cpu::is_cpu_support_avx512, DispatchStub).
ATEN_CAPABILITY_FLAGS = {"avx2": ("avx2", "fma"), "avx512": ("avx512f", "avx512vl", "avx512bw", "avx512dq", "fma")}


def cpuinfo_field(cpuinfo: str, name: str) -> str:
    """The first processor's ``name`` line of /proc/cpuinfo text ("" without one)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return " ".join(value.split())
    return ""


def cpuinfo_flags(cpuinfo: str) -> set[str]:
    return set(cpuinfo_field(cpuinfo, "flags").split())


def kernel_limits(name: str, host_flags: set[str] | None = None) -> dict[str, str]:
    """The environment that makes a new process act as ``AS_CPU[name]``: GS_CPU_AS and the kernel
    caps. ``host_flags``: this machine's cpuinfo flags (default: read now). oneDNN's, MKL's and
    fbgemm's variables are maxima, but ATen takes ATEN_CPU_CAPABILITY without asking the hardware
    (avx512 on an AVX2 EPYC: SIGILL in the first softmax), so it is left out where the host lacks
    what that capability's kernels use (``aten_capability_missing``): ATen then picks the host's best."""
    CpuFeatures("x86_64", False, "").acting_as(name)  # validates the name
    limits = {CPU_AS_VAR: name, **AS_CPU[name].kernel_limits}
    host = cpuinfo_flags(read_text("/proc/cpuinfo")) if host_flags is None else host_flags
    if aten_capability_missing(limits.get(ATEN_VAR, ""), host):
        del limits[ATEN_VAR]
    return limits


def aten_capability_missing(capability: str, host_flags: set[str]) -> list[str]:
    """The flags ``host_flags`` lacks for ATen's ``capability`` ("avx2", "avx512"; others: none)."""
    return [flag for flag in ATEN_CAPABILITY_FLAGS.get(capability, ()) if flag not in host_flags]


def read_text(path: str) -> str:
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
