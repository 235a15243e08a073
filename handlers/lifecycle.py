"""The request lifecycle, owned once for every model: read this file top to bottom.

A ``Worker`` is one model in one process, built from plain arguments (the model's name, its
unpacked folder, its model-config.yaml, the device), so any front end can drive it: TorchServe's
(``handlers.torchserve_wire``), the bench's raw forward. At start it reads the settings, sizes
the threads, loads the model and applies the precision ``handlers.precision`` chose (and
torch.compile if asked). Per batch it

    1. decodes each request alone     ModelHandler.decode; a bad one gets its 4xx, the rest go on
    2. collates the decoded items     ModelHandler.collate, moved to the device
    3. runs one forward               under inference mode, in the chosen precision (int8: one per item)
    4. splits the outputs per item    ModelHandler.postprocess, then moved to the CPU
    5. encodes each answer alone      ModelHandler.encode
    6. gives each request its status  one table (handlers.errors) gives status, body, log level

and always returns one reply per request, with the seconds each stage took. If the forward runs
out of memory, each item is retried alone, so only the item that does not fit gets its 507.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from handlers import auto_precision, precision, torch_compile, tuning
from handlers.errors import error_body, kind_of
from handlers.launch import launch_env_report
from handlers.model_handler import ModelHandler
from handlers.payload import Payload
from handlers.precision_modes import precision_mode
from handlers.settings import CORE_SETTINGS, read_settings

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"  # what the model is and how well it did; returned by describe


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any  # the answer, or the error body


@dataclass
class StageSeconds:
    """Where one batch's time went (a front end exports them per batch)."""
    decode: float = 0.0  # every request's decode (bytes -> tensors)
    forward: float = 0.0  # collate, the forward on the device, postprocess, back to the CPU
    encode: float = 0.0  # every answer's encode
    items: int = 0  # requests in the batch


class Worker:
    """One model in one process, built once at start. ``model_dir``: the unpacked archive (weights,
    metadata.json); ``config``: its model-config.yaml as a dict (our ``handler:`` section,
    TorchServe's minWorkers and startupTimeout); ``device``: "cpu" or "cuda:N";
    ``serialized_file``: the manifest's model file. A bad ``handler:`` setting: ValueError naming the key."""

    def __init__(self, handler: ModelHandler, model_name: str, model_dir: Path | str, config: dict | None = None,
                 device: torch.device | str = "cpu", serialized_file: str | None = None):
        config = config or {}
        self.handler, self.model_name, self.model_dir = handler, model_name, Path(model_dir)
        self.settings = read_settings(config, {**CORE_SETTINGS, **handler.settings})
        self.device = torch.device(device)
        self.plan = precision.plan(self.settings["precision"], self.device, type(handler).__name__, handler.offers_int8)
        self.threads = tuning.configure(self.device, self.settings["cores"], int(config.get("minWorkers", 1) or 1))
        log.info("%s: tuning: device=%s %s; %s; %s", model_name, self.device, self.threads.words, self.plan.words,
                 launch_env_report())
        metadata_path = self.model_dir / METADATA_FILE
        self.metadata = json.loads(metadata_path.read_text()) if metadata_path.exists() else {}
        # auto's outcome is kept from an earlier start, or timed at this one with this worker
        # starting alone (handlers.auto_precision); every worker's start takes part in that lock.
        self.auto = auto_precision.AutoStart(model_name, self.model_dir, self.plan, self.threads.threads,
                                             str(self.device), int(config.get("startupTimeout", auto_precision.TORCHSERVE_STARTUP_TIMEOUT_S)))
        with self.auto.starting():
            # self.model: fp32, or its int8 copy once chosen; self.runner: it or its compiled form.
            self.model = handler.load(self.model_dir, serialized_file, self.settings, self.device).to(self.device).eval()
            self.runner = self.model
            self.precision, self.precision_why = "fp32", self.plan.reason
            self._accelerate()

    def _accelerate(self) -> None:
        """The precision ``handlers.precision`` chooses (its guards run the check inputs);
        torch.compile if asked (eager on failure)."""
        wants_compile = self.settings["compile"] != "off"
        if not self.plan.candidates and not wants_compile:
            return
        check_items = [self.handler.decode(payload) for payload in self.handler.check_inputs()]
        if self.plan.candidates:
            choice = precision.choose(self.plan, self.model, check_items, self._run, self.metadata, self.auto)
            self.precision, self.model, self.precision_why = choice.precision, choice.model, choice.why
            self.runner = self.model
            log.info("%s: tuning: precision=%s (%s)", self.model_name, self.precision, self.precision_why)
        if wants_compile and not check_items:
            log.warning("%s: tuning: compile skipped: no check inputs to compile and prove it on; eager", self.model_name)
        elif wants_compile:
            self.runner = torch_compile.compiled(
                self.model, self.settings["compile"], self.settings["compile_timeout_s"],
                lambda runner: self._run(runner, check_items, self.precision), self.model_name)

    def describe(self) -> dict:
        """The archive's metadata, and the precision this worker chose (auto decides it at start)."""
        serving = {"precision": self.precision, "precision_why": self.precision_why}
        return {"model": self.model_name, **self.metadata, "serving": serving}

    # -- one batch --------------------------------------------------------------------------------

    def answer(self, payloads: list[Payload]) -> tuple[list[Reply], StageSeconds]:
        """One reply per payload, in order: decode each alone, one forward, encode each alone;
        and the seconds each stage took."""
        replies: list[Reply | None] = [None] * len(payloads)
        items: dict[int, Any] = {}
        started = time.perf_counter()
        for index, payload in enumerate(payloads):
            try:
                items[index] = self.handler.decode(payload)
            except Exception as error:  # noqa: BLE001 - every error is answered per request
                replies[index] = self._error_reply(index, error)
        decoded = time.perf_counter()
        outputs, failures = self._forward_isolating_oom(items)
        forwarded = time.perf_counter()
        for index, error in failures.items():
            replies[index] = self._error_reply(index, error)
        for index, output in outputs.items():
            try:
                replies[index] = Reply(200, self.handler.encode(output, items[index]))
            except Exception as error:  # noqa: BLE001
                replies[index] = self._error_reply(index, error)
        return replies, StageSeconds(decoded - started, forwarded - decoded, time.perf_counter() - forwarded, len(payloads))

    def _forward_isolating_oom(self, items: dict[int, Any]) -> tuple[dict[int, Any], dict[int, Exception]]:
        """(index -> output, index -> the error that index gets). One forward for the batch; if
        it runs out of memory, each item is tried alone."""
        if not items:
            return {}, {}
        try:
            return dict(zip(items, self.forward(list(items.values())))), {}
        except (MemoryError, torch.OutOfMemoryError) as error:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # give back what the failed batch left cached
            if len(items) == 1:
                return {}, {index: error for index in items}
            log.warning("%s: out of memory on a batch of %d; retrying one by one", self.model_name, len(items))
            outputs, failures = {}, {}
            for index, item in items.items():
                alone, failed = self._forward_isolating_oom({index: item})
                outputs.update(alone)
                failures.update(failed)
            return outputs, failures
        except Exception as error:  # noqa: BLE001 - a failed forward fails its batch, nothing more
            return {}, {index: error for index in items}

    def forward(self, items: list, precision: str | None = None) -> list:
        """Decoded items -> one output per item, on the CPU: collate, one forward on the device
        in ``precision`` (default: the chosen one), postprocess. The bench's raw-forward hook."""
        try:
            return self._run(self.runner, items, precision or self.precision)
        except Exception as error:
            if self.runner is self.model or not torch_compile.is_compile_error(error):
                raise
            # A new input shape made the compiled model recompile, and that failed.
            self.runner = torch_compile.eager(self.model, f"recompiling failed ({torch_compile.one_line(error)})",
                                              self.model_name)
            return self._run(self.runner, items, precision or self.precision)

    def _run(self, runner: torch.nn.Module, items: list, precision: str) -> list:
        if precision == "int8" and len(items) > 1:  # dynamic int8 scales by the whole batch's range
            return [row for item in items for row in self._run(runner, [item], precision)]
        batch = to_device(self.handler.collate(items), self.device)
        with torch.inference_mode(), precision_mode(precision, self.device, self.plan.fast_math, self.plan.fpmath_env):
            rows = self.handler.postprocess(self.handler.forward(runner, batch), batch)
        if len(rows) != len(items):
            raise RuntimeError(f"{type(self.handler).__name__}.postprocess returned {len(rows)} outputs for {len(items)} items")
        return [to_device(row, torch.device("cpu")) for row in rows]

    def _error_reply(self, index: int, error: Exception) -> Reply:
        kind = kind_of(error)
        # A RequestError's message is ours and holds no request content; the content is never logged.
        log.log(kind.log_level, "%s: request %d of batch answered %d %s", self.model_name, index, kind.status,
                type(error).__name__, exc_info=error if kind.status == 500 else None)
        return Reply(kind.status, error_body(error))


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors in ``value`` (a tensor, or dicts/lists/tuples of them) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        # To CUDA from page-locked memory: the copy runs asynchronously (non_blocking needs it).
        pinned = value.pin_memory() if device.type == "cuda" and value.device.type == "cpu" else value
        return pinned.to(device, non_blocking=device.type == "cuda")
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value
