"""auto's outcome: timed by a worker that starts alone, kept under a key of what can change it, reused."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from handlers import auto_precision
from handlers import quiet_start
from handlers.auto_precision import decide, kept_outcome, outcome_key
from handlers.quiet_start import OthersBusy, start_lock
from tests.test_int8 import HELD_OUT_KEPT, int8_probe, tuning_lines

pytestmark = pytest.mark.cpu_sensitive


def key(root, **changes):
    """auto's key for the "archive" in root/model (the cache goes beside it, in root/cache)."""
    folder = root / "model"
    folder.mkdir(exist_ok=True)
    arguments = {"cpu_identity": "x86_64 Some CPU (avx2 fma)", "torch_version": "2.14.1", "device": "cpu",
                 "threads": 2, "candidates": ("int8",), "environ": {}} | changes
    return outcome_key(folder, **arguments)


def test_the_key_changes_with_everything_that_can_change_the_outcome(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.pt").write_bytes(b"weights")
    base = key(tmp_path)
    assert key(tmp_path) == base
    variants = [key(tmp_path, cpu_identity="x86_64 Other CPU (avx2 fma avx512f)"), key(tmp_path, torch_version="2.15.0"),
                key(tmp_path, device="cuda:0"), key(tmp_path, threads=1), key(tmp_path, candidates=("bf16", "int8")),
                key(tmp_path, environ={"ONEDNN_MAX_CPU_ISA": "AVX2"}), key(tmp_path, environ={"GS_CPU_AS": "avx2"})]
    assert all(variant != base for variant in variants)
    (tmp_path / "model" / "weights.pt").write_bytes(b"other weights")
    assert key(tmp_path)["archive"] != base["archive"]
    (tmp_path / "model" / "__pycache__").mkdir()
    (tmp_path / "model" / "__pycache__" / "x.pyc").write_bytes(b"compiled at start")  # not part of the archive
    assert key(tmp_path) == key(tmp_path, environ={"OMP_SCHEDULE": "static"})


def test_an_outcome_timed_alone_is_kept_and_read_back_without_timing(tmp_path):
    timed = []

    def time_them():
        timed.append(1)
        return "int8", {"fp32": 0.0100, "int8": 0.0051}

    cache = tmp_path / "cache"
    assert kept_outcome("m", key(tmp_path), cache) is None
    first = decide("m", key(tmp_path), None, ["fp32", "int8"], time_them, alone=True, folder=cache)
    kept = kept_outcome("m", key(tmp_path), cache)
    again = decide("m", key(tmp_path), kept, ["fp32", "int8"], time_them, alone=True, folder=cache)
    assert timed == [1]
    assert first.precision == again.precision == "int8" and again.timings_ms == {"fp32": 10.0, "int8": 5.1}
    assert first.words(2).startswith("auto: fastest that passed its guards by 15% over fp32, timed on 2 check inputs "
                                     "as served (one batch, int8 one by one): fp32 10.0 ms, int8 5.1 ms, int8 49% faster than fp32 (timed at ")
    assert first.source.startswith("timed at this start, cached in ") and again.source.startswith("cache ")
    assert again.timed_at == first.timed_at
    assert kept_outcome("m", key(tmp_path, cpu_identity="aarch64 hwcap 0x0 hwcap2 0x0"), cache) is None
    # A kept choice that did not pass its guards at this start (it cannot, with the same key) is timed again.
    retimed = decide("m", key(tmp_path), kept, ["fp32"], lambda: ("fp32", {"fp32": 0.01}), alone=True, folder=cache)
    assert retimed.precision == "fp32" and retimed.source.startswith("timed at this start")


def test_an_outcome_timed_beside_other_starts_is_not_kept(tmp_path):
    cache = tmp_path / "cache"
    outcome = decide("m", key(tmp_path), None, ["fp32", "int8"], lambda: ("fp32", {"fp32": 0.01, "int8": 0.02}),
                     alone=False, folder=cache)
    assert outcome.precision == "fp32" and outcome.source.endswith("(the start lock was not had in time): not cached")
    assert kept_outcome("m", key(tmp_path), cache) is None


def test_a_timing_start_is_alone_and_other_starts_go_side_by_side(tmp_path):
    """Starts hold the lock shared; one that times holds it exclusively: it waits for the others
    and they wait for it, and a waiter gives up after its wait."""
    spans: dict[str, tuple[float, float]] = {}

    def start(name: str, exclusive: bool, hold_s: float) -> None:
        with start_lock(exclusive, wait_s=10, folder=tmp_path) as locked:
            assert locked
            begin = time.monotonic()
            time.sleep(hold_s)
            spans[name] = (begin, time.monotonic())

    threads = [threading.Thread(target=start, args=args) for args in
               (("shared1", False, 0.4), ("shared2", False, 0.4), ("timing", True, 0.4), ("timing2", True, 0.4))]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()

    def overlap(a: str, b: str) -> bool:
        return spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]

    assert overlap("shared1", "shared2")  # starts without timing go side by side
    for timing in ("timing", "timing2"):
        assert not [other for other in spans if other != timing and overlap(timing, other)]
    with open(tmp_path / "start.lock", "a+") as held:  # a timing start elsewhere, for longer than the wait
        fcntl.flock(held, fcntl.LOCK_EX)
        with start_lock(False, wait_s=0.3, folder=tmp_path) as locked:
            assert not locked


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
    assert line.split(" (cache ")[0] == first_line.split(" (timed at this start")[0]  # the same timings, read back
    assert again.precision_why == line.split("tuning: precision=")[1].split(" (", 1)[1][:-1]


def test_what_other_processes_use_is_measured_and_a_kept_record_says_it(tmp_path):
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.5)  # the interpreter has started and spins
        with OthersBusy() as others:
            time.sleep(1.0)
    finally:
        spinner.kill()
        spinner.wait()
    assert others.share >= 0.5 / os.cpu_count()  # one CPU of the machine's, at the least most of it
    outcome = decide("m", key(tmp_path), None, ["fp32"], lambda: ("fp32", {"fp32": 0.01}), alone=True,
                     folder=tmp_path / "cache")
    assert f"while other processes used {outcome.others_busy:.0%} of the CPUs" in outcome.words(2)
    assert kept_outcome("m", key(tmp_path), tmp_path / "cache").others_busy == outcome.others_busy
    (entry,) = (tmp_path / "cache").glob("m-*.json")
    entry.write_text('{"precision": "int8"}')  # not a whole record: timed again, never a failed start
    assert kept_outcome("m", key(tmp_path), tmp_path / "cache") is None


@pytest.mark.parametrize("record", [
    '{"precision": "banana", "timings_ms": {"fp32": 1.8, "bf16": 1.6}, "timed_at": "t", "others_busy": 0.0}',
    '{"precision": "fp32", "timings_ms": "fast", "timed_at": "t", "others_busy": 0.0}',
    '{"precision": "fp32", "timings_ms": {"fp32": "x", "bf16": 1}, "timed_at": "t", "others_busy": 0.0}',
    '{"precision": "fp32", "timings_ms": {"fp32": 1.8}, "timed_at": 5, "others_busy": 0.0}',
    '[]', '', '{"precision": "fp32", "timings_ms": {"fp32": 1.8}',
])
def test_a_kept_file_that_is_not_a_whole_record_means_timing_again(tmp_path, caplog, record):
    cache = tmp_path / "cache"
    decide("m", key(tmp_path), None, ["fp32", "bf16"], lambda: ("fp32", {"fp32": 0.01, "bf16": 0.02}), alone=True,
           folder=cache)
    (entry,) = cache.glob("m-*.json")
    kept = json.loads(entry.read_text())
    try:
        edited = {**json.loads(record), "key": kept["key"]} if record.startswith("{") and record.endswith("}") else None
    except ValueError:
        edited = None
    entry.write_text(json.dumps(edited) if edited else record)
    assert kept_outcome("m", key(tmp_path), cache) is None
    assert "ignored" in caplog.text and "timing again" in caplog.text


def test_an_unwritable_cache_folder_serves_and_keeps_nothing(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()

    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(auto_precision.Path, "write_text", refuse)
    outcome = decide("m", key(tmp_path), None, ["fp32"], lambda: ("fp32", {"fp32": 0.01}), alone=True, folder=cache)
    assert outcome.precision == "fp32" and outcome.source == "timed at this start, not cached (PermissionError: Operation not permitted)"
    monkeypatch.undo()
    cache.chmod(0o500)  # and a lock file that cannot be made: the start goes on without the lock
    try:
        with start_lock(True, wait_s=0.1, folder=cache / "sub") as locked:
            assert locked is (os.geteuid() == 0)  # root may write anyway
    finally:
        cache.chmod(0o700)


def test_a_timing_on_a_busy_machine_is_not_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(quiet_start, "QUIET_SHARE", 0.10)
    monkeypatch.setattr(quiet_start, "QUIET_WAIT_S", 0.0)
    monkeypatch.setattr(quiet_start, "_others_share", lambda start, end: 0.86)
    outcome = decide("m", key(tmp_path), None, ["fp32"], lambda: ("fp32", {"fp32": 0.01}), alone=True,
                     folder=tmp_path / "cache")
    assert outcome.others_busy == 0.86 and outcome.source.endswith("(other processes used 10% or more of the CPUs): not cached")
    assert kept_outcome("m", key(tmp_path), tmp_path / "cache") is None


def test_the_words_say_why_fp32_was_kept():
    assert auto_precision.verdict("fp32", {"fp32": 1.8, "bf16": 1.6}) == "bf16 only 11% faster than fp32, under 15%: fp32 kept"
    assert auto_precision.verdict("int8", {"fp32": 12.9, "bf16": 14.0, "int8": 8.6}) == "int8 33% faster than fp32"
    assert auto_precision.verdict("fp32", {"fp32": 1.0, "bf16": 2.0}) == "fp32 the fastest"
    assert auto_precision.verdict("int8", {"fp32": 0.0, "int8": 0.0}) == "int8 chosen"  # under 1 µs: no ratio
