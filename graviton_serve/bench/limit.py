"""The limit: our handler's raw collate + forward on one full batch, in this process, no server."""

from __future__ import annotations

import importlib
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import yaml

from graviton_serve.archive import unpack_archive
from graviton_serve.bench.results import RawForward


def raw_limit(workload: str, archive: Path, bodies: list[bytes], min_seconds: float = 5.0) -> RawForward:
    """Our handler's collate + forward on one full batch, in this process, as a worker would run it."""
    from handlers.lifecycle import Worker
    from handlers.payload import Payload

    with tempfile.TemporaryDirectory(prefix="gs-bench-raw-") as work:
        manifest = unpack_archive(archive, Path(work))
        config = yaml.safe_load((Path(work) / "model-config.yaml").read_text())
        module = importlib.import_module(f"handlers.{Path(manifest['model']['handler']).stem}")
        context = SimpleNamespace(model_name=workload, manifest=manifest, model_yaml_config=config,
                                  system_properties={"model_dir": work, "gpu_id": None})
        worker = Worker(module.handle.make_handler(), context)
        batch = int(config.get("batchSize", 1))
        decoded = []
        for body in bodies[: 4 * batch]:
            try:
                decoded.append(worker.handler.decode(Payload(body=body)))
            except Exception:  # noqa: BLE001 - a body the model refuses is no part of its forward
                pass
        if not decoded:
            raise ValueError(f"{workload}: none of the bodies decodes; nothing to time")
        items = [decoded[i % len(decoded)] for i in range(batch)]
        for _ in range(2):
            worker.forward(items)
        times = []
        started = time.perf_counter()
        while time.perf_counter() - started < min_seconds or len(times) < 3:
            begin = time.perf_counter()
            worker.forward(items)
            times.append(time.perf_counter() - begin)
        forward = statistics.median(times)
        return RawForward(workload, batch, worker.tuning.threads, worker.precision, batch / forward, forward * 1000)
