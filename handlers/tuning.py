"""Where a worker runs: its cores and threads, decided once at start from what the kernel
reports rather than from guesses (precision is ``handlers.precision``'s).

- cores: with ``handler.cores: N`` the worker claims N of the CPUs it may use for itself, by
  holding a lock file per CPU (``GS_CORE_LOCK_DIR``, one folder per server). The kernel drops a
  dead worker's locks, so the worker TorchServe starts in its place claims the freed cores and
  the sets stay disjoint. With ``shared`` (the default) no core is claimed and the model's
  workers split the CPUs between them;
- threads: the claimed cores, or the CPUs this process may use (its affinity, narrowed by a
  cgroup CPU quota: a container limited to 2 CPUs on a 64-core host gets 2) divided by the
  model's worker count; OMP_NUM_THREADS overrides. Inter-op threads: 1.
"""

from __future__ import annotations

import fcntl
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from handlers.cpu_features import read_text
from handlers.launch import CORE_LOCK_DIR_VAR

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


@dataclass
class Threads:
    """What a worker runs on: its intra-op threads and, with ``handler.cores``, its claimed cores."""

    threads: int
    claim: CoreClaim | None  # held for the worker's lifetime: its locks are its cores
    words: str  # for the tuning line: "threads=2 inter-op 1 (why)"


def configure(device: torch.device, cores_wanted: int = 0, workers: int = 1) -> Threads:
    """Claim cores (``handler.cores``), then set torch's intra-op threads once and inter-op to 1."""
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
    return Threads(threads, claim, f"threads={threads} {interop} ({thread_reason})")
