"""What the CPU can do, from what the kernel reports rather than from guesses. No torch import:
the launch path reads this too, before any worker starts."""

from __future__ import annotations

import ctypes
import platform
from dataclasses import dataclass
from pathlib import Path

AT_HWCAP2 = 26
HWCAP2_BF16 = 1 << 14
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
ARM_MACHINES = ("aarch64", "arm64")  # what platform.machine() says on Linux and on macOS


@dataclass(frozen=True)
class CpuFeatures:
    machine: str  # "x86_64", "aarch64", ...
    bf16: bool
    evidence: str  # what the decision rests on, for the log line

    @property
    def is_arm(self) -> bool:
        return self.machine in ARM_MACHINES

    @classmethod
    def detect(cls) -> "CpuFeatures":
        machine = platform.machine().lower()
        if machine in ARM_MACHINES:
            # The hardware capability bits, not /proc/cpuinfo: under qemu-user that shows the host.
            return cls.from_hwcap2(machine, _getauxval(AT_HWCAP2))
        return cls.from_cpuinfo(machine, read_text("/proc/cpuinfo"))

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
