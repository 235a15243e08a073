"""Shared fixtures: the demo MNIST archive, and real TorchServe instances on free loopback ports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psutil
import pytest

from graviton_serve.archive import ArchiveSpec, build_archive, unpack_archive
from graviton_serve.demo_store import build_demo_store
from graviton_serve.paths import CONFIG_FILE, MODEL_STORE
from graviton_serve.server import TorchServe
from graviton_serve.torchserve_config import Ports
from handlers import quiet_start
from handlers.launch import PRECISION_CACHE_DIR_VAR
from handlers.mnist import WEIGHTS_FILE

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def own_precision_cache(tmp_path_factory, monkeypatch):
    """Each test's in-process workers keep auto's outcomes in a folder of their own, so no test
    reuses another's timing (servers started by a test's fixtures keep theirs in their run folder)."""
    monkeypatch.setenv(PRECISION_CACHE_DIR_VAR, str(tmp_path_factory.mktemp("precision-cache")))
    # and do not depend on what else this machine runs: no waiting for quiet, every timing kept
    # (tests/test_auto_precision.py sets the share back where it tests that rule)
    monkeypatch.setattr(quiet_start, "QUIET_SHARE", 1.01)


@pytest.fixture(scope="session")
def mnist_mar() -> Path:
    """The demo store's mnist.mar (built once and cached; scripts/test builds it first)."""
    (archive,) = build_demo_store(MODEL_STORE, ["mnist"])
    return archive


@pytest.fixture(scope="session")
def mnist_dir(mnist_mar, tmp_path_factory) -> Path:
    """mnist.mar unpacked, as TorchServe unpacks it for a worker."""
    folder = tmp_path_factory.mktemp("mnist_model")
    unpack_archive(mnist_mar, folder)
    return folder


def mnist_variant(mnist_dir: Path, export_dir: Path, name: str, model_config: dict) -> Path:
    """The demo MNIST model repackaged under ``name`` with another model-config.yaml."""
    spec = ArchiveSpec(name=name, handler_module="mnist", weights=mnist_dir / WEIGHTS_FILE, model_config=model_config,
                       metadata=json.loads((mnist_dir / "metadata.json").read_text()))
    return build_archive(spec, export_dir)


def slow_archive(store: Path, work: Path) -> Path:
    """Model "slow" (tests/slow_handler.py): the body is how many tenths of a second to sleep; one request per batch."""
    weights = work / "none.pt"
    weights.write_bytes(b"")
    spec = ArchiveSpec("slow", "", weights, {"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "maxBatchDelay": 1,
                                             "responseTimeout": 60}, {}, handler_file=TESTS / "slow_handler.py")
    return build_archive(spec, store)


class ServerUnderTest:
    """Starts a real TorchServe over ``archives`` and, on stop, checks nothing of it is left."""

    def __init__(self, root: Path, archives: list[Path]):
        store = root / "store"
        store.mkdir(parents=True)
        for archive in archives:
            shutil.copy2(archive, store / archive.name)
        self.server = TorchServe(root / "run", store, CONFIG_FILE, ports=Ports.free())
        self.pids: list[int] = []

    def start(self) -> TorchServe:
        self.server.start(timeout=180)
        self.pids = [process.pid for process in self.server.processes()]
        return self.server

    def stop(self) -> None:
        self.server.stop()
        alive = [pid for pid in self.pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"TorchServe processes left running: {alive}"


@pytest.fixture(scope="module")
def mnist_server(mnist_mar, tmp_path_factory):
    under_test = ServerUnderTest(tmp_path_factory.mktemp("ts_mnist"), [mnist_mar])
    server = under_test.start()
    yield server
    under_test.stop()
