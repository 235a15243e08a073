"""``precision: auto``'s timing: done quietly, once, and kept.

auto keeps the fastest of fp32 and the reduced precisions that passed their guards, timed on
the model's check inputs. Timed while other workers start, the choice followed the noise (on a
2-core Zen 4, 3 of 7 models changed precision between two starts of the same store; one check
batch took 626 ms in one start and 267 ms in the other). So:

- one worker times at a time: the timing runs under an exclusive lock shared by every worker
  that uses the same cache folder (a server's workers; GS_PRECISION_CACHE_DIR);
- the outcome is kept in that folder under a key of everything that can change it: the
  archive's files, the CPU (model and the flags that change kernels, GS_CPU_AS and the kernel
  caps), torch's version, the device, the worker's threads and the precisions that passed. A
  later start of the same archive on the same kind of machine reuses it instead of timing;
- a reduced precision must beat fp32 by AUTO_MIN_GAIN.

Delete the folder (or change anything in the key) to time again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from handlers.launch import PRECISION_CACHE_DIR_VAR

AUTO_MIN_GAIN = 0.15  # a reduced precision must be this much faster than fp32 to be chosen
AUTO_ROUNDS = 5  # timed forwards per precision, interleaved, each over all check inputs as one batch
AUTO_BUDGET_S = 20.0  # stop adding rounds after this long (each precision has had at least one)
# How long a worker waits for another's timing before it times anyway (and keeps nothing): well
# inside TorchServe's default startupTimeout of 120 s, which also covers loading the model.
LOCK_WAIT_S = 60.0
# The variables that change which kernels torch's libraries run (handlers.cpu_features.AS_CPU).
KERNEL_VARS = ("GS_CPU_AS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
               "FBGEMM_ENABLE_INSTRUCTIONS", "DNNL_DEFAULT_FPMATH_MODE")


@dataclass(frozen=True)
class Outcome:
    """auto's choice and where it came from."""

    precision: str
    timings_ms: dict[str, float]  # the medians it rests on
    source: str  # "timed at this start", "cache", or "timed at this start, not cached (...)"
    timed_at: str  # when the timing ran (UTC)

    def words(self, items: int) -> str:
        timings = ", ".join(f"{precision} {ms:.1f} ms" for precision, ms in self.timings_ms.items())
        return (f"auto: fastest that passed its guards by {AUTO_MIN_GAIN:.0%} over fp32, timed on {items} check inputs "
                f"as one batch: {timings} ({self.source}, timed {self.timed_at})")


def fastest(run: Callable[[str], Any], precisions: list[str]) -> tuple[str, dict[str, float]]:
    """Time ``run(precision)`` for each precision (fp32 first) in interleaved rounds, within the
    budget; the fastest by median, unless it gains less than AUTO_MIN_GAIN over fp32; and every
    median in seconds."""
    times: dict[str, list[float]] = {precision: [] for precision in precisions}
    started = time.perf_counter()
    for _ in range(AUTO_ROUNDS):
        for precision in precisions:
            begin = time.perf_counter()
            run(precision)
            times[precision].append(time.perf_counter() - begin)
        if time.perf_counter() - started > AUTO_BUDGET_S:
            break
    medians = {precision: statistics.median(values) for precision, values in times.items()}
    best = min(medians, key=medians.get)
    if best != "fp32" and medians[best] > (1 - AUTO_MIN_GAIN) * medians["fp32"]:
        best = "fp32"
    return best, medians


def cache_dir(environ: dict[str, str] | None = None) -> Path:
    """Where auto's outcomes are kept: GS_PRECISION_CACHE_DIR (the launch path sets one per
    server), else a folder in the temp dir (a stock ``torchserve --start``)."""
    environ = os.environ if environ is None else environ
    return Path(environ.get(PRECISION_CACHE_DIR_VAR) or Path(tempfile.gettempdir()) / f"graviton-serve-precision-{os.getuid()}")


def archive_digest(model_dir: Path) -> str:
    """sha256 of every file TorchServe unpacked for the model (names and contents)."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(model_dir)).encode() + b"\0")
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def outcome_key(model_dir: Path, cpu_identity: str, torch_version: str, device: str, threads: int,
                passed: list[str], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything auto's outcome depends on."""
    environ = os.environ if environ is None else environ
    return {"archive": archive_digest(model_dir), "cpu": cpu_identity, "torch": torch_version, "device": device,
            "threads": threads, "passed": sorted(passed),
            "kernel_env": {name: environ[name] for name in KERNEL_VARS if name in environ}}


def auto_outcome(model_name: str, key: dict[str, Any], time_them: Callable[[], tuple[str, dict[str, float]]],
                 folder: Path | None = None) -> Outcome:
    """The cached outcome for ``key``, else ``time_them()`` under the timing lock, kept for next time."""
    folder = cache_dir() if folder is None else folder
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    entry = folder / f"{model_name}-{digest}.json"
    cached = _read(entry, key)
    if cached:
        return cached
    with _timing_lock(folder / "timing.lock", LOCK_WAIT_S) as locked:
        cached = _read(entry, key)  # another worker of this model may have timed while we waited
        if cached:
            return cached
        best, seconds = time_them()
        timed_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        timings = {precision: round(1000 * value, 1) for precision, value in seconds.items()}
        if not locked:
            return Outcome(best, timings, f"timed at this start, not cached: another worker held the timing lock "
                                          f"for over {LOCK_WAIT_S:.0f} s", timed_at)
        record = {"precision": best, "timings_ms": timings, "timed_at": timed_at, "key": key}
        temporary = entry.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(record, indent=1))  # timings in the order they ran
        os.replace(temporary, entry)  # whole or absent: a reader never sees half a file
        return Outcome(best, timings, f"timed at this start, cached in {entry}", timed_at)


def _read(entry: Path, key: dict[str, Any]) -> Outcome | None:
    try:
        record = json.loads(entry.read_text())
    except (OSError, ValueError):
        return None
    if record.get("key") != key:  # a digest collision or a hand-edited file: time again
        return None
    return Outcome(record["precision"], record["timings_ms"], f"cache {entry}", record["timed_at"])


@contextlib.contextmanager
def _timing_lock(path: Path, wait_s: float) -> Iterator[bool]:
    """Hold ``path``'s exclusive lock (True), or after ``wait_s`` go on without it (False). The
    kernel drops a dead worker's lock with its open file."""
    with open(path, "a+") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
