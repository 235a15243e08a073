"""The limits: our handler in the bench's own process, no server, on one full batch of the bench's bodies.

- forward (fp32): collate + forward + postprocess in fp32, the inputs decoded beforehand: what
  the model alone costs, before any precision choice;
- serving: decode + collate + forward + postprocess + encode (``Worker.answer``) in the precision
  the server's worker chose: everything a server must do per item, without the server.

Both run with every CPU this process may use as threads, on a batch of what the server holds at
once (its workers × batchSize): the machine's best for the model, whatever split the server uses.
The workers are built once per workload and timed in every round, right after the round's cells,
so a ratio compares a cell with a limit measured minutes apart, not across the whole run.
"""

from __future__ import annotations

import importlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import yaml

from graviton_serve.archive import unpack_archive
from graviton_serve.bench.results import Limit

FORWARD, SERVING = "forward (fp32)", "serving"


def _batch_seconds(run: Callable[[], object], min_seconds: float) -> tuple[float, float]:
    """The median and the fastest of the batches run over ``min_seconds`` (at least 3). The limit is
    the median, as the served cell is an average over its whole length: the fastest batch is a
    moment of a shared machine that nothing sustains (MNIST's batch of 8 in one process on a Zen 4,
    2026-12-07: 1,600-1,850 items/s at the fastest, 1,140-1,250 at the median, in the same 3 s).
    The fastest was the limit while an idle Ray node ran beside the limits (it moved their median
    by up to 47%); Ray now runs in a phase of its own."""
    for _ in range(2):
        run()
    times = []
    started = time.perf_counter()
    while time.perf_counter() - started < min_seconds or len(times) < 3:
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return statistics.median(times), min(times)


class Limits:
    """The two limit workers of one workload's archive. ``served_precision``: what the server's
    worker chose (its describe), so the serving limit runs what the server runs. A context manager."""

    def __init__(self, workload: str, archive: Path, bodies: list[bytes], served_precision: str):
        from handlers.lifecycle import Worker
        from handlers.payload import Payload

        self.workload = workload
        self._folder = tempfile.TemporaryDirectory(prefix="gs-bench-limit-")
        folder = Path(self._folder.name)
        manifest = unpack_archive(archive, folder)
        config = yaml.safe_load((folder / "model-config.yaml").read_text())
        self.batch = int(config.get("batchSize", 1)) * int(config.get("minWorkers", 1) or 1)
        config["minWorkers"] = 1  # one process: every usable CPU is its threads
        module = importlib.import_module(f"handlers.{Path(manifest['model']['handler']).stem}")
        self.workers = {}
        for kind, precision in ((FORWARD, "fp32"), (SERVING, served_precision)):
            settings = {**config, "handler": {**config.get("handler", {}), "precision": precision}}
            self.workers[kind] = Worker(module.handle.make_handler(), workload, folder, settings, "cpu",
                                        manifest["model"].get("serializedFile"))
        decoder = self.workers[SERVING].handler
        usable = []
        for body in bodies[: 4 * self.batch]:
            payload = Payload(body=body)
            try:
                usable.append((payload, decoder.decode(payload)))
            except Exception:  # noqa: BLE001 - a body the model refuses is no part of its cost
                pass
        if not usable:
            raise ValueError(f"{workload}: none of the bodies decodes; nothing to time")
        self.chosen = [usable[i % len(usable)] for i in range(self.batch)]

    def measure(self, round_number: int, min_seconds: float = 3.0) -> list[Limit]:
        """[forward (fp32), serving], each the median batch of at least ``min_seconds`` of them."""
        found = []
        for kind, worker in self.workers.items():
            if kind == FORWARD:
                items = [item for _, item in self.chosen]
                seconds, fastest = _batch_seconds(lambda: worker.forward(items), min_seconds)
            else:
                requests = [payload for payload, _ in self.chosen]
                seconds, fastest = _batch_seconds(lambda: worker.answer(requests), min_seconds)
            found.append(Limit(self.workload, kind, self.batch, worker.threads.threads, worker.precision,
                               self.batch / seconds, seconds * 1000, round_number, fastest * 1000))
        return found

    def __enter__(self) -> "Limits":
        return self

    def __exit__(self, *exc) -> None:
        self.workers.clear()
        self._folder.cleanup()
