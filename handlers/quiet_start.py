"""How a worker that times ``precision: auto`` gets a quiet machine: the server's start lock
(held exclusively by a timing worker from loading its model to the end of its timing, shared by
every other worker's start), and a wait until other processes leave the CPUs nearly idle.
Timed beside other workers' starts, auto's choice followed the noise (handlers.auto_precision).
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from pathlib import Path
from typing import Iterator

QUIET_SHARE = 0.10  # other processes' share of all CPUs under which the machine counts as quiet
QUIET_WAIT_S = 15.0  # how long a worker waits for quiet before it times anyway
QUIET_WINDOW_S = 0.5  # seconds over which a share is measured (/proc/stat counts in 10 ms ticks)


class OthersBusy:
    """The share of all CPUs that processes other than this one used over a ``with`` block,
    from /proc/stat (every CPU's busy time) less /proc/self/stat (this process's, all threads)."""

    share = 0.0

    def __enter__(self) -> "OthersBusy":
        self._start = _cpu_ticks()
        return self

    def __exit__(self, *exc) -> bool:
        self.share = _others_share(self._start, _cpu_ticks())
        return False


def wait_for_quiet(wait_s: float | None = None) -> None:
    """Return once other processes used under QUIET_SHARE of the CPUs for a QUIET_WINDOW_S, or
    after ``wait_s`` (QUIET_WAIT_S) either way."""
    deadline = time.monotonic() + (QUIET_WAIT_S if wait_s is None else wait_s)
    while time.monotonic() < deadline:
        with OthersBusy() as others:
            time.sleep(QUIET_WINDOW_S)
        if others.share < QUIET_SHARE:
            return


def _cpu_ticks() -> tuple[int, int, int] | None:
    """(all CPUs' busy ticks, all CPUs' total ticks, this process's ticks), or None where /proc is missing."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return total - idle, total, int(own[11]) + int(own[12])  # utime + stime (fields 14 and 15)


def _others_share(start: tuple[int, int, int] | None, end: tuple[int, int, int] | None) -> float:
    if start is None or end is None or end[1] <= start[1]:
        return 0.0
    others = (end[0] - start[0]) - (end[2] - start[2])
    return max(0.0, others / (end[1] - start[1]))


@contextlib.contextmanager
def start_lock(exclusive: bool, wait_s: float, folder: Path) -> Iterator[bool]:
    """Hold ``folder``'s start lock (auto's cache folder, one per server) for a worker's start:
    exclusively for a worker that will time, shared for the others. Yields whether it was had
    within ``wait_s`` seconds (if not, the start goes on without it). The kernel drops a dead
    worker's lock with its open file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / "start.lock", "a+")
    except OSError:  # a read-only or missing folder: no lock to share, start without it
        yield False
        return
    with handle:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
                locked = True
                break
            except OSError:
                if time.monotonic() > deadline:
                    locked = False
                    break
                time.sleep(0.1)
        try:
            yield locked
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)
