"""``precision: auto``'s timing: done quietly, once, and kept.

auto keeps the fastest of fp32 and the reduced precisions that passed their guards, timed on
the model's check inputs. Timed while other workers start, the choice followed the noise (on a
2-core Zen 4, 3 of 7 models changed precision between two starts of the same store; one check
batch took 626 ms in one start and 267 ms in the other). So:

- a worker that must time starts alone: it holds the server's start lock exclusively from
  loading its model to the end of its timing, while every other worker holds it shared for its
  own start (loading, guards). Workers that do not time start side by side, never during a
  timing. A worker that cannot get the lock within its wait goes on without it;
- the outcome is kept in the cache folder (GS_PRECISION_CACHE_DIR; the launch path sets one per
  server) under a key of everything that can change it: the archive's files, the CPU (model and
  the flags that change kernels), torch's version, the device, the worker's threads, the
  candidates, and the variables that cap or change kernels. Which candidates pass their guards
  follows from these, so it is not part of the key. A later start with the same key reads the
  outcome back and does not time (nor lock anyone out);
- before timing, the worker waits until other processes use under quiet_start.QUIET_SHARE
  of the machine's CPUs: the lock does not cover what happens before a worker's start (seven
  worker processes importing torch), and a first start timed beside that chose bf16 for MNIST
  at 18.0 ms fp32 where a quiet measurement gives 1.8 ms and keeps fp32. What others used
  while it timed is in the outcome's words;
- each precision runs at least AUTO_ROUNDS times and AUTO_SECONDS_EACH in all;
- a timing is kept only if it was quiet (others under QUIET_SHARE), had the lock, and the folder
  can be written; a kept file that is not a whole record is ignored. The cache never stops a start;
- a reduced precision must beat fp32 by AUTO_MIN_GAIN.

Delete the folder (or change anything in the key) to time again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from handlers import quiet_start
from handlers.cpu_features import AS_CPU, CPU_AS_VAR
from handlers.launch import FAST_MATH_VAR, PRECISION_CACHE_DIR_VAR

log = logging.getLogger(__name__)

AUTO_MIN_GAIN = 0.15  # a reduced precision must be this much faster than fp32 to be chosen
AUTO_ROUNDS = 5  # timed forwards per precision at least, interleaved, each over all check inputs as served
# and rounds go on until each precision has run this long in all: a median of 5 forwards of 2 ms
# moved by 10% between quiet starts (MNIST 1.8 / 1.9 ms), enough to flip a choice near the margin
AUTO_SECONDS_EACH = 1.0
AUTO_BUDGET_S = 20.0  # stop adding rounds after this long (each precision has had at least one)
# TorchServe gives a worker's load startupTimeout seconds (model-config.yaml, 120 by default; our
# archives say 300): a worker waits for the start lock at most half of it, and keeps the other
# half for its own start (loading, guards, the quiet wait, timing).
TORCHSERVE_STARTUP_TIMEOUT_S = 120
# The variables that change which kernels torch's libraries run: GS_CPU_AS, the caps it comes
# with (handlers.cpu_features.AS_CPU), and oneDNN's default math.
KERNEL_VARS = (CPU_AS_VAR, *dict.fromkeys(name for cpu in AS_CPU.values() for name in cpu.kernel_limits), FAST_MATH_VAR)


@dataclass(frozen=True)
class Outcome:
    """auto's choice and where it came from."""

    precision: str
    timings_ms: dict[str, float]  # the medians it rests on, in the order they were timed
    source: str  # "timed at this start, cached in <file>", "cache <file>", or why it was not kept
    timed_at: str  # when the timing ran (UTC)
    others_busy: float  # the share of all CPUs other processes used while it timed

    def words(self, items: int) -> str:
        timings = ", ".join(f"{precision} {ms:.1f} ms" for precision, ms in self.timings_ms.items())
        return (f"auto: fastest that passed its guards by {AUTO_MIN_GAIN:.0%} over fp32, timed on {items} check inputs "
                f"as served (one batch, int8 one by one): {timings}, {verdict(self.precision, self.timings_ms)} ({self.source}, timed "
                f"{self.timed_at} while other processes used {self.others_busy:.0%} of the CPUs)")


def fastest(run: Callable[[str], Any], precisions: list[str]) -> tuple[str, dict[str, float]]:
    """Time ``run(precision)`` for each precision (fp32 first) in interleaved rounds, at least
    AUTO_ROUNDS and AUTO_SECONDS_EACH each, within the budget; the fastest by median, unless it
    gains less than AUTO_MIN_GAIN over fp32; and every median in seconds."""
    times: dict[str, list[float]] = {precision: [] for precision in precisions}
    started = time.perf_counter()
    rounds = 0
    while rounds < AUTO_ROUNDS or min(sum(values) for values in times.values()) < AUTO_SECONDS_EACH:
        for precision in precisions:
            begin = time.perf_counter()
            run(precision)
            times[precision].append(time.perf_counter() - begin)
        rounds += 1
        if time.perf_counter() - started > AUTO_BUDGET_S:
            break
    medians = {precision: statistics.median(values) for precision, values in times.items()}
    return chosen(medians), medians


def chosen(medians: dict[str, float]) -> str:
    """The fastest, unless it gains less than AUTO_MIN_GAIN over fp32."""
    best = min(medians, key=medians.get)
    return best if best == "fp32" or medians[best] <= (1 - AUTO_MIN_GAIN) * medians["fp32"] else "fp32"


def verdict(precision: str, timings: dict[str, float]) -> str:
    """In words: how the chosen precision compares with fp32 and the fastest."""
    fastest_one = min(timings, key=timings.get)
    if timings["fp32"] <= 0:  # below the record's resolution: no ratio to give
        return f"{precision} chosen"
    if precision != "fp32":
        return f"{precision} {1 - timings[precision] / timings['fp32']:.0%} faster than fp32"
    if fastest_one == "fp32":
        return "fp32 the fastest"
    return (f"{fastest_one} only {1 - timings[fastest_one] / timings['fp32']:.0%} faster than fp32, "
            f"under {AUTO_MIN_GAIN:.0%}: fp32 kept")


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
                candidates: tuple[str, ...], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything auto's outcome depends on."""
    environ = os.environ if environ is None else environ
    return {"archive": archive_digest(model_dir), "cpu": cpu_identity, "torch": torch_version, "device": device,
            "threads": threads, "candidates": list(candidates),
            "kernel_env": {name: environ[name] for name in KERNEL_VARS if name in environ}}


def kept_outcome(model_name: str, key: dict[str, Any], folder: Path) -> Outcome | None:
    """The outcome an earlier start kept for ``key``, or None."""
    entry = _entry(model_name, key, folder)
    try:
        record = json.loads(entry.read_text())
    except OSError:
        return None  # none kept
    except ValueError:
        record = None
    outcome = _outcome(record, f"cache {entry}") if isinstance(record, dict) and record.get("key") == key else None
    if outcome is None:
        log.warning("%s: tuning: ignored %s: not a whole record of auto's outcome for this key; timing again",
                    model_name, entry)
    return outcome


def _outcome(record: dict, source: str) -> Outcome | None:
    """The record as an Outcome, if every field is what this module writes."""
    timings, precision = record.get("timings_ms"), record.get("precision")
    numbers = isinstance(timings, dict) and all(
        isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 for value in timings.values())
    if not (numbers and "fp32" in timings and precision in timings and isinstance(record.get("timed_at"), str)
            and isinstance(record.get("others_busy"), (int, float))):
        return None
    return Outcome(precision, timings, source, record["timed_at"], record["others_busy"])


def decide(model_name: str, key: dict[str, Any], kept: Outcome | None, passed: list[str],
           time_them: Callable[[], tuple[str, dict[str, float]]], alone: bool, folder: Path) -> Outcome:
    """The kept outcome if it chose one of ``passed``; else ``time_them()``, kept for later
    starts if this worker timed ``alone`` (it held the start lock exclusively)."""
    if kept is not None and kept.precision in passed:
        return kept
    quiet_start.wait_for_quiet()
    with quiet_start.OthersBusy() as others:
        began = time.monotonic()
        best, seconds = time_them()
        # /proc/stat counts in ticks of 10 ms: a share needs a window of many ticks to mean anything
        time.sleep(max(0.0, quiet_start.QUIET_WINDOW_S - (time.monotonic() - began)))
    timed_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    outcome = Outcome(best, {precision: round(1000 * value, 3) for precision, value in seconds.items()}, "", timed_at,
                      round(others.share, 3))
    if not alone:
        return dataclasses.replace(outcome, source="timed at this start beside other workers' starts "
                                                   "(the start lock was not had in time): not cached")
    if outcome.others_busy >= quiet_start.QUIET_SHARE:  # a busy machine's timing is not kept: the next start times again
        return dataclasses.replace(outcome, source=f"timed at this start on a busy machine (other processes used "
                                                   f"{quiet_start.QUIET_SHARE:.0%} or more of the CPUs): not cached")
    entry = _entry(model_name, key, folder)
    record = {"precision": best, "timings_ms": outcome.timings_ms, "timed_at": timed_at,
              "others_busy": outcome.others_busy, "key": key}
    temporary = entry.with_suffix(f".{os.getpid()}.tmp")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(record, indent=1))
        os.replace(temporary, entry)  # whole or absent: a reader never sees half a file
    except OSError as error:  # a read-only folder, a full disk: serve anyway, keep nothing
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        return dataclasses.replace(outcome, source=f"timed at this start, not cached ({type(error).__name__}: "
                                                   f"{error.strerror or error})")
    return dataclasses.replace(outcome, source=f"timed at this start, cached in {entry}")


class AutoStart:
    """One worker's part: its key and kept outcome, its start under the lock, its decision."""

    def __init__(self, model_name: str, model_dir: Path, plan: Any, threads: int, device: str,
                 startup_timeout_s: int, folder: Path | None = None):
        """``plan``: the worker's ``precision.PrecisionPlan`` (requested, candidates, cpu)."""
        self.model_name = model_name
        self.folder = cache_dir() if folder is None else folder  # auto's cache, and the start lock's
        self.times = plan.requested == "auto" and bool(plan.candidates)  # auto, with something to time
        self.key = outcome_key(model_dir, plan.cpu, torch_version(), device, threads, plan.candidates) if self.times else {}
        self.kept = kept_outcome(model_name, self.key, self.folder) if self.times else None
        self.wait_s = startup_timeout_s / 2
        self.alone = False  # held the lock exclusively: its timing is quiet, and kept

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """The worker's start (load, guards, timing): alone if it must time, else beside the
        other workers that do not."""
        exclusive = self.times and self.kept is None
        with quiet_start.start_lock(exclusive, self.wait_s, self.folder) as locked:
            self.alone = locked and exclusive
            if self.alone:  # another worker of this model may have timed while this one waited
                self.kept = kept_outcome(self.model_name, self.key, self.folder)
            yield

    def decide(self, passed: list[str], time_them: Callable[[], tuple[str, dict[str, float]]]) -> Outcome:
        return decide(self.model_name, self.key, self.kept, passed, time_them, self.alone, self.folder)


def torch_version() -> str:
    import torch  # the launch path imports this module's neighbours without torch

    return torch.__version__


def _entry(model_name: str, key: dict[str, Any], folder: Path) -> Path:
    return folder / f"{model_name}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]}.json"
