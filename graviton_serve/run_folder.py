"""The layout of a server's run folder: every file and folder one TorchServe instance keeps there.

This module alone names what lies under a run folder; every other module asks a ``RunFolder``.
Which run folder: ``paths.RUN_DIR`` for ``scripts/serve`` (``.run/``), ``GS_RUN_DIR`` in the container,
a test's temp folder for the servers a test starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# TorchServe's own log files, in ``RunFolder.logs`` (it appends to them across starts)
MODEL_LOG = "model_log.log"  # the workers' output (the handler's log lines, tracebacks)
TS_LOG = "ts_log.log"  # the frontend's


class _Under:
    """A path under the run folder, its parts named once (read as ``RunFolder(...).<name>``)."""

    def __init__(self, *parts: str):
        self.parts = parts

    def __get__(self, folder: "RunFolder | None", owner: type) -> "Path | _Under":
        return self if folder is None else folder.path.joinpath(*self.parts)


@dataclass(frozen=True)
class RunFolder:
    """The run folder at ``path`` (an absolute path, as ``TorchServe`` resolves it); nothing is made
    here: ``TorchServe.start`` makes the folders."""

    path: Path

    config = _Under("config.properties")  # the rendered config.properties TorchServe starts with (--ts-config)
    key_file = _Under("key_file.json")  # token auth's keys: TorchServe writes it at start, removes it at stop
    # TorchServe's logs and metrics logs (LOG_LOCATION, METRICS_LOCATION), and the launcher's output
    logs = _Under("logs")
    console_log = _Under("logs", "console.log")  # the ``torchserve`` launcher's stdout and stderr
    # the instance's own TMPDIR: TorchServe writes its pid file and worker sockets to the temp dir
    tmp = _Under("tmp")
    pid_file = _Under("tmp", ".model_server.pid")  # the frontend's PID, as TorchServe writes it
    busy = _Under("busy")  # GS_BUSY_DIR: a file named by a worker's PID while it handles a batch (draining waits)
    draining = _Under("draining")  # present while the server drains: the container's readiness probe fails
    core_locks = _Under("cores")  # GS_CORE_LOCK_DIR: the workers' core claims
    precision_cache = _Under("precision")  # GS_PRECISION_CACHE_DIR: auto's kept outcomes, across restarts
    ray = _Under("ray")  # scripts/serve --engine ray: the Ray node's folder, its keys and Serve config (graviton_serve.ray_cluster)
    front = _Under("front")  # the HTTP front's (nginx's) config, pid and temp folders (graviton_serve.http_front)

    def log(self, name: str) -> Path:
        """One log file in ``logs``, e.g. ``log(MODEL_LOG)``."""
        return self.logs / name
