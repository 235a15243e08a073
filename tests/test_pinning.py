"""Thread pinning through a real TorchServe: each worker of a model with ``handler.cores: 1``
holds its own core, and after TorchServe restarts a killed worker the sets are still disjoint."""

from __future__ import annotations

import os
import signal
import time

import pytest
import requests

from graviton_serve.run_folder import MODEL_LOG
from tests.conftest import TESTS, ServerUnderTest, mnist_variant

pytestmark = pytest.mark.integration

CPUS = sorted(os.sched_getaffinity(0))


def workers(server, model: str) -> dict[int, str]:
    return {worker["pid"]: worker["status"] for worker in server.management(timeout=10).model(model)["workers"]}


def affinity(pid: int) -> set[int]:
    return set(os.sched_getaffinity(pid))


@pytest.fixture(scope="module")
def pinned_server(mnist_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ts_pinned")
    archive = mnist_variant(mnist_dir, root / "built", "mnist_pinned", {
        "minWorkers": len(CPUS), "maxWorkers": len(CPUS), "batchSize": 1, "maxBatchDelay": 5, "responseTimeout": 60,
        "handler": {"cores": 1}})
    under_test = ServerUnderTest(root, [archive])
    server = under_test.start()
    yield server
    under_test.stop()


def ready_pids(server, count: int, timeout: float = 120) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = workers(server, "mnist_pinned")
        ready = [pid for pid, status in state.items() if status == "READY"]
        if len(ready) == count:
            return ready
        time.sleep(0.5)
    raise AssertionError(f"{count} READY workers expected within {timeout}s: {workers(server, 'mnist_pinned')}")


def assert_disjoint_single_cores(pids: list[int]) -> None:
    sets = [affinity(pid) for pid in pids]
    assert all(len(cores) == 1 for cores in sets), sets
    assert len(set().union(*sets)) == len(pids), f"workers share cores: {sets}"
    assert set().union(*sets) <= set(CPUS)


@pytest.mark.skipif(len(CPUS) < 2, reason="pinning two workers needs two CPUs in this process's affinity")
def test_each_worker_holds_its_own_core_even_after_a_restart(pinned_server):
    pids = ready_pids(pinned_server, len(CPUS))
    assert_disjoint_single_cores(pids)
    log = pinned_server.run_folder.log(MODEL_LOG).read_text()
    assert log.count("pinned to cores") >= len(CPUS)
    assert "threads=1 inter-op 1" in log

    victim = pids[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = workers(pinned_server, "mnist_pinned")
        if victim not in state and sum(status == "READY" for status in state.values()) == len(CPUS):
            break
        time.sleep(0.5)
    restarted = ready_pids(pinned_server, len(CPUS))
    assert victim not in restarted
    assert_disjoint_single_cores(restarted)

    reply = requests.post(pinned_server.url("inference", "predictions/mnist_pinned"),
                          data=(TESTS / "data" / "digit.png").read_bytes(), headers=pinned_server.auth(), timeout=60)
    assert reply.status_code == 200 and next(iter(reply.json())) == "7"
