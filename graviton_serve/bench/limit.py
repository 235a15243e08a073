"""The limits: our handler in this process, no server, on one full batch of the bench's bodies.

- forward (fp32): collate + forward + postprocess in fp32, the inputs decoded beforehand: what
  the model alone costs, before any precision choice;
- serving: decode + collate + forward + postprocess + encode (``Worker.answer``) in the precision
  the worker chose: everything a server must do per item, without the server.
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


def _worker(workload: str, folder: Path, manifest: dict, precision: str | None):
    """A worker over the unpacked archive, as TorchServe's would be; ``precision`` overrides its config."""
    from handlers.lifecycle import Worker

    config = yaml.safe_load((folder / "model-config.yaml").read_text())
    if precision:
        config.setdefault("handler", {})["precision"] = precision
    module = importlib.import_module(f"handlers.{Path(manifest['model']['handler']).stem}")
    worker = Worker(module.handle.make_handler(), workload, folder, config, "cpu", manifest["model"].get("serializedFile"))
    return worker, int(config.get("batchSize", 1))


def _median_seconds(run: Callable[[], object], min_seconds: float) -> float:
    for _ in range(2):
        run()
    times = []
    started = time.perf_counter()
    while time.perf_counter() - started < min_seconds or len(times) < 3:
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def limits(workload: str, archive: Path, bodies: list[bytes], min_seconds: float = 5.0) -> list[Limit]:
    """[forward (fp32), serving] for the workload's archive, each timed for at least ``min_seconds``."""
    from handlers.payload import Payload

    found = []
    with tempfile.TemporaryDirectory(prefix="gs-bench-limit-") as work:
        folder = Path(work)
        manifest = unpack_archive(archive, folder)
        for kind, precision in (("forward (fp32)", "fp32"), ("serving", None)):
            worker, batch = _worker(workload, folder, manifest, precision)
            payloads = [Payload(body=body) for body in bodies[: 4 * batch]]
            usable = []
            for payload in payloads:
                try:
                    usable.append((payload, worker.handler.decode(payload)))
                except Exception:  # noqa: BLE001 - a body the model refuses is no part of its cost
                    pass
            if not usable:
                raise ValueError(f"{workload}: none of the bodies decodes; nothing to time")
            chosen = [usable[i % len(usable)] for i in range(batch)]
            if precision == "fp32":
                items = [item for _, item in chosen]
                seconds = _median_seconds(lambda: worker.forward(items), min_seconds)
            else:
                requests = [payload for payload, _ in chosen]
                seconds = _median_seconds(lambda: worker.answer(requests), min_seconds)
            found.append(Limit(workload, kind, batch, worker.threads.threads, worker.precision, batch / seconds,
                               seconds * 1000))
    return found
