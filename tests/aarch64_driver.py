"""Run inside the arm64 root under qemu-user (tests/test_aarch64.py starts it); also runs natively.

    python3 tests/aarch64_driver.py JOB.json RESULT.json

JOB ``{"serve": [model, ...]}``: each model is loaded through TorchServe's own loader and
Service (the worker's code path minus its socket) and answers its batch; the result holds each
reply's status and JSON, and the handler core's "tuning:" log lines.
JOB ``{"probe": "fast_math_switches"}``: after `import torch` and a first operation, (1)
DNNL_DEFAULT_FPMATH_MODE=BF16 is set, (2) torch's fast-math switches are turned on, (3) a
ResNet18 runs at 64x64 with and without them; nn.Linear (2-D and 3-D input), matmul and Conv2d
run in (1) and (2). The tuning step's thread decision (its words for the tuning line) is reported too.

With ONEDNN_VERBOSE=1, oneDNN prints each primitive it runs on stdout; the driver prints a
``#graviton-serve <model or phase> <step>`` line before each part, so the test can tell whose
kernels they were (both write unbuffered enough: oneDNN flushes each line, the driver too).
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


MARK = "#graviton-serve"


def mark(part: str, step: str) -> None:
    if os.environ.get("ONEDNN_VERBOSE"):  # only where oneDNN's log is being read
        print(f"{MARK} {part} {step}", flush=True)


def serve(models: list[dict]) -> dict:
    from tests.inprocess import load_service, predict, request

    answers = {}
    for model in models:
        started = time.monotonic()
        mark(model["name"], "load")  # worker start: the accuracy guard's forwards
        service = load_service(Path(model["dir"]), model["handler"], name=model["name"])
        mark(model["name"], "serve")  # the batch of requests
        replies = predict(service, [request(decode_value(entry["value"]), entry["content_type"]) for entry in model["requests"]])
        answers[model["name"]] = {
            "replies": [{"status": reply.status, "body": reply.json()} for reply in replies],
            "seconds": round(time.monotonic() - started, 1),
        }
    return {"answers": answers}


def fast_math_switches() -> dict:
    import torch
    import torchvision

    from handlers import precision_modes, tuning

    decided = tuning.configure(torch.device("cpu"))
    torch.manual_seed(0)
    linear, conv = torch.nn.Linear(64, 32), torch.nn.Conv2d(3, 8, 3)
    inputs = {"linear_2d": torch.randn(4, 64), "linear_3d": torch.randn(2, 4, 64), "matmul": torch.randn(2, 4, 16, 64),
              "conv": torch.randn(2, 3, 16, 16)}

    def layers() -> None:
        linear(inputs["linear_2d"])
        linear(inputs["linear_3d"])
        torch.matmul(inputs["matmul"], inputs["matmul"].transpose(-1, -2))
        conv(inputs["conv"])

    with torch.inference_mode():
        mark("first_op", "run")
        layers()
        os.environ["DNNL_DEFAULT_FPMATH_MODE"] = "BF16"  # after `import torch` and a first operation
        mark("late_variable", "run")
        layers()
        mark("switches", "run")
        with precision_modes.mkldnn_bf16():
            layers()
        network = torchvision.models.resnet18(num_classes=1000).eval()
        image = torch.rand(1, 3, 64, 64)
        mark("resnet18_fp32", "run")
        exact = network(image)
        mark("resnet18_switches", "run")
        with precision_modes.mkldnn_bf16():
            fast = network(image)
        mark("end", "run")
    return {"threads": decided.threads, "threads_why": decided.words, "torch_threads": torch.get_num_threads(),
            "affinity": sorted(os.sched_getaffinity(0)),
            "resnet18": {"top1_same": bool(exact.argmax() == fast.argmax()), "largest_change": float((exact - fast).abs().max()),
                         "logit_range": float(exact.max() - exact.min())}}


def torch_build() -> dict:
    import torch

    settings = torch.__config__.show()
    blas = settings.split("BLAS_INFO=")[1].split(",")[0] if "BLAS_INFO=" in settings else "unknown"
    return {"torch": torch.__version__, "blas": blas, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def main(job_path: str, result_path: str) -> None:
    sys.path.insert(0, str(ROOT))  # run as a script: the checkout's handlers/ and tests/
    job = json.loads(Path(job_path).read_text())
    lines = TuningLines()
    logging.getLogger().addHandler(lines)
    logging.getLogger().setLevel(logging.INFO)
    result = serve(job["serve"]) if "serve" in job else fast_math_switches()
    result.update(machine=platform.machine(), tuning=lines.lines, build=torch_build())
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
