"""Run inside the arm64 root under qemu-user (tests/test_aarch64.py starts it); also runs natively.

    python3 tests/aarch64_driver.py JOB.json RESULT.json

JOB ``{"serve": [model, ...]}``: each model is loaded through TorchServe's own loader and
Service (the worker's code path minus its socket) and answers its batch; the result holds each
reply's status and JSON, and the handler core's "tuning:" log lines.
JOB ``{"probe": "late_fast_math"}``: torch is imported first, then DNNL_DEFAULT_FPMATH_MODE=BF16
is set before any operation, then an nn.Linear and a Conv2d run (ONEDNN_VERBOSE on stdout shows
which kernels and attributes oneDNN used); the tuning step's thread decision is reported too.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class TuningLines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "tuning:" in message:
            self.lines.append(message)


def decode_value(value: dict):
    return base64.b64decode(value["b64"]) if "b64" in value else value["text"]


def serve(models: list[dict]) -> dict:
    from tests.inprocess import load_service, predict, request

    answers = {}
    for model in models:
        started = time.monotonic()
        service = load_service(Path(model["dir"]), model["handler"], name=model["name"])
        replies = predict(service, [request(decode_value(entry["value"]), entry["content_type"]) for entry in model["requests"]])
        answers[model["name"]] = {
            "replies": [{"status": reply.status, "body": reply.json()} for reply in replies],
            "seconds": round(time.monotonic() - started, 1),
        }
    return {"answers": answers}


def late_fast_math() -> dict:
    import torch

    from handlers import tuning

    decided = tuning.configure("probe", torch.device("cpu"), "auto")
    os.environ["DNNL_DEFAULT_FPMATH_MODE"] = "BF16"  # after `import torch`, before any operation
    torch.manual_seed(0)
    with torch.inference_mode():
        torch.nn.Linear(64, 64)(torch.randn(4, 64))
        torch.nn.Conv2d(3, 8, 3)(torch.randn(2, 3, 16, 16))
    return {"threads": decided.threads, "torch_threads": torch.get_num_threads(), "affinity": sorted(os.sched_getaffinity(0))}


def main(job_path: str, result_path: str) -> None:
    sys.path.insert(0, str(ROOT))  # run as a script: the checkout's handlers/ and tests/
    job = json.loads(Path(job_path).read_text())
    lines = TuningLines()
    logging.getLogger().addHandler(lines)
    logging.getLogger().setLevel(logging.INFO)
    result = serve(job["serve"]) if "serve" in job else late_fast_math()
    result.update(machine=platform.machine(), tuning=lines.lines)
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
