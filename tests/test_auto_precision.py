"""auto's outcome: timed one worker at a time, kept under a key of what can change it, reused."""

from __future__ import annotations

import fcntl
import threading
import time

import pytest

from handlers import auto_precision
from handlers.auto_precision import auto_outcome, outcome_key
from tests.test_int8 import HELD_OUT_KEPT, int8_probe, tuning_lines

pytestmark = pytest.mark.cpu_sensitive


def key(root, **changes):
    """auto's key for the "archive" in root/model (the cache goes beside it, in root/cache)."""
    folder = root / "model"
    folder.mkdir(exist_ok=True)
    arguments = {"cpu_identity": "x86_64 Some CPU (avx2 fma)", "torch_version": "2.14.1", "device": "cpu",
                 "threads": 2, "passed": ["fp32", "int8"], "environ": {}} | changes
    return outcome_key(folder, **arguments)


def test_the_key_changes_with_everything_that_can_change_the_outcome(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.pt").write_bytes(b"weights")
    base = key(tmp_path)
    assert key(tmp_path) == base
    variants = [key(tmp_path, cpu_identity="x86_64 Other CPU (avx2 fma avx512f)"), key(tmp_path, torch_version="2.15.0"),
                key(tmp_path, device="cuda:0"), key(tmp_path, threads=1), key(tmp_path, passed=["fp32", "bf16", "int8"]),
                key(tmp_path, environ={"ONEDNN_MAX_CPU_ISA": "AVX2"}), key(tmp_path, environ={"GS_CPU_AS": "avx2"})]
    assert all(variant != base for variant in variants)
    (tmp_path / "model" / "weights.pt").write_bytes(b"other weights")
    assert key(tmp_path)["archive"] != base["archive"]
    (tmp_path / "model" / "__pycache__").mkdir()
    (tmp_path / "model" / "__pycache__" / "x.pyc").write_bytes(b"compiled at start")  # not part of the archive
    assert key(tmp_path) == key(tmp_path, environ={"OMP_SCHEDULE": "static"})


def test_an_outcome_is_timed_once_then_read_back(tmp_path):
    timed = []

    def time_them():
        timed.append(1)
        return "int8", {"fp32": 0.0100, "int8": 0.0051}

    first = auto_outcome("m", key(tmp_path), time_them, tmp_path / "cache")
    second = auto_outcome("m", key(tmp_path), time_them, tmp_path / "cache")
    assert timed == [1]
    assert first.precision == second.precision == "int8" and second.timings_ms == {"fp32": 10.0, "int8": 5.1}
    assert first.source.startswith("timed at this start, cached in ") and second.source.startswith("cache ")
    assert second.timed_at == first.timed_at
    other_cpu = auto_outcome("m", key(tmp_path, cpu_identity="aarch64 hwcap 0x0 hwcap2 0x0"), time_them, tmp_path / "cache")
    assert timed == [1, 1] and other_cpu.source.startswith("timed at this start")


def test_a_worker_that_cannot_get_the_timing_lock_times_anyway_and_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(auto_precision, "LOCK_WAIT_S", 0.3)
    cache = tmp_path / "cache"
    cache.mkdir()
    with open(cache / "timing.lock", "a+") as held:  # another worker, timing
        fcntl.flock(held, fcntl.LOCK_EX)
        outcome = auto_outcome("m", key(tmp_path), lambda: ("fp32", {"fp32": 0.01, "int8": 0.02}), cache)
    assert outcome.precision == "fp32"
    assert outcome.source == "timed at this start, not cached: another worker held the timing lock for over 0 s"
    assert not list(cache.glob("m-*.json"))


def test_workers_time_one_at_a_time(tmp_path):
    spans = []

    def time_them():
        begin = time.monotonic()
        time.sleep(0.3)
        spans.append((begin, time.monotonic()))
        return "fp32", {"fp32": 0.01}

    workers = [threading.Thread(target=auto_outcome, args=(f"model{n}", key(tmp_path), time_them, tmp_path / "cache"))
               for n in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    spans.sort()
    assert len(spans) == 3 and all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:]))


def test_a_restarted_worker_serves_the_kept_precision_without_timing(tmp_path, caplog, monkeypatch):
    caplog.set_level("INFO")
    first = int8_probe(tmp_path / "a", "int8_stable", "auto", HELD_OUT_KEPT)._entry_point.worker
    first_line = tuning_lines(caplog)[-1]
    assert "(timed at this start, cached in " in first_line

    def no_timing(run, precisions):
        raise AssertionError("timed again although the outcome was kept")

    monkeypatch.setattr(auto_precision, "fastest", no_timing)
    again = int8_probe(tmp_path / "b", "int8_stable", "auto", HELD_OUT_KEPT)._entry_point.worker  # same files elsewhere
    line = tuning_lines(caplog)[-1]
    assert again.precision == first.precision and "(cache " in line
    assert line.split(" ms (")[0] == first_line.split(" ms (")[0]  # the same timings, read back
    assert again.precision_why == line.split("tuning: precision=")[1].split(" (", 1)[1][:-1]
