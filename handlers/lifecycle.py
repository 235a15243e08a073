"""The request lifecycle, owned once for every model: read this file top to bottom.

TorchServe imports a model's handler module and calls its ``handle(data, context)``: once with
``data=None`` when the worker starts, then once per batch of requests. ``handle`` is a
``TorchServeHandler``: at start it builds a ``Worker`` (settings, device, threads, the model,
precision and compile); per batch the worker

    1. decodes each request alone     ModelHandler.decode; a bad one gets its 4xx, the rest go on
    2. collates the decoded items     ModelHandler.collate, moved to the device
    3. runs one forward               under inference mode, in the chosen precision
    4. splits the outputs per item    ModelHandler.postprocess, then moved to the CPU
    5. encodes each answer alone      ModelHandler.encode
    6. sets each request's status     one table (handlers.errors) gives status, body, log level
    7. records the stages' seconds    TorchServe metrics (handlers.torchserve_wire), on Prometheus

and always returns one answer per request. If the forward runs out of memory, each item is
retried alone, so only the item that does not fit gets its 507.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from handlers import acceleration, auto_precision, torchserve_wire, tuning
from handlers.errors import error_body, kind_of
from handlers.model_handler import ModelHandler
from handlers.payload import Payload
from handlers.settings import CORE_SETTINGS, read_settings

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"  # what the model is and how well it did; returned by describe


class TorchServeHandler:
    """The ``handle(data, context)`` callable a handler module exposes to TorchServe."""

    def __init__(self, make_handler: Callable[[], ModelHandler]):
        self.make_handler = make_handler
        self.worker: Worker | None = None
        self.busy: torchserve_wire.BusyMarker | None = None
        self.enveloped: bool | None = None  # decided on the first batch: the caller is fixed for the worker's life

    def __call__(self, data: Any, context: Any) -> Any:
        if self.worker is None:
            self.worker = Worker(self.make_handler(), context)
            self.busy = torchserve_wire.BusyMarker()
            log.info("%s: ready on %s, pid %d", self.worker.model_name, self.worker.device, os.getpid())
        if data is None:
            return None
        if self.enveloped is None:
            self.enveloped = torchserve_wire.called_by_envelope(sys._getframe(1))
        with self.busy:
            return self.worker.handle(data, context, self.enveloped)


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any  # the answer, or the error body


@dataclass
class StageSeconds:
    """Where one batch's time went (exported per batch as TorchServe metrics)."""

    decode: float = 0.0  # every request's decode (bytes -> tensors)
    forward: float = 0.0  # collate, the forward on the device, postprocess, back to the CPU
    encode: float = 0.0  # every answer's encode
    items: int = 0  # requests in the batch


class Worker:
    """One model in one TorchServe worker process: built once at start, then serves batches."""

    def __init__(self, handler: ModelHandler, context: Any):
        config = getattr(context, "model_yaml_config", None) or {}
        self.handler = handler
        self.model_name = context.model_name
        self.model_dir = Path(context.system_properties["model_dir"])
        self.settings = read_settings(config, {**CORE_SETTINGS, **handler.settings})
        gpu_id = context.system_properties.get("gpu_id")
        on_gpu = gpu_id is not None and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{int(gpu_id)}" if on_gpu else "cpu")
        if self.settings["precision"] == "int8" and not handler.offers_int8:
            raise ValueError(f"model-config.yaml: 'handler.precision' is invalid: int8 is dynamic quantization of "
                             f"nn.Linear layers, offered by text models and mnist, not by {type(handler).__name__}")
        self.tuning = tuning.configure(self.model_name, self.device, self.settings["precision"],
                                       self.settings["cores"], int(config.get("minWorkers", 1) or 1), handler.offers_int8)
        metadata_path = self.model_dir / METADATA_FILE
        self.metadata = json.loads(metadata_path.read_text()) if metadata_path.exists() else {}
        serialized_file = (context.manifest or {}).get("model", {}).get("serializedFile")
        # auto's outcome is kept from an earlier start, or timed at this one with this worker
        # starting alone (handlers.auto_precision); every worker's start takes part in that lock.
        self.auto = auto_precision.AutoStart(self.model_name, self.model_dir, self.tuning, str(self.device),
                                             int(config.get("startupTimeout", auto_precision.TORCHSERVE_STARTUP_TIMEOUT_S)))
        with self.auto.starting():
            # What forwards run: fp32, or its int8 copy once chosen; self.runner is it or its compiled form.
            self.model = handler.load(self.model_dir, serialized_file, self.settings, self.device).to(self.device).eval()
            self.runner = self.model
            self.precision, self.precision_why = "fp32", self.tuning.precision_reason
            self._accelerate()

    def _accelerate(self) -> None:
        """Reduced precision if its guards pass (auto: the fastest that passes); torch.compile if
        asked (eager on failure)."""
        wants_compile = self.settings["compile"] != "off"
        if not self.tuning.candidates and not wants_compile:
            return
        check_items = [self.handler.decode(payload) for payload in self.handler.check_inputs()]
        if self.tuning.candidates:
            self.precision, self.model, why = self._choose_precision(check_items)
            self.runner = self.model
            if self.precision == "fp32" and self.tuning.fpmath_env:
                why += f"; {tuning.ONEDNN_KEPT_OUT}"
            self.precision_why = why
            log.info("%s: tuning: precision=%s (%s)", self.model_name, self.precision, why)
        if wants_compile and not check_items:
            log.warning("%s: tuning: compile skipped: no check inputs to compile and prove it on; eager", self.model_name)
        elif wants_compile:
            self.runner = acceleration.compiled(
                self.model, self.settings["compile"], self.settings["compile_timeout_s"],
                lambda runner: self._run(runner, check_items, self.precision), self.model_name)

    def _choose_precision(self, check_items: list) -> tuple[str, torch.nn.Module, str]:
        """(precision, the module its forwards run, why). Each candidate must keep the fp32
        top-1 of the check inputs, run as one batch and one by one; int8 must also not have lost
        held-out accuracy at build (auto: a measurement must exist). Asked for one: it, if it
        passed. auto: fp32 and the passed ones timed on the check inputs, the fastest kept
        (handlers.auto_precision: timed by a worker that starts alone, kept for later starts)."""
        candidates = self.tuning.candidates
        if not check_items:
            return "fp32", self.model, f"{', '.join(candidates)} refused: the model has no check inputs for the accuracy guard"
        reference = self._run(self.model, check_items, "fp32")
        passed: dict[str, torch.nn.Module] = {"fp32": self.model}
        verdicts = []
        for precision in candidates:
            module = self.model
            if precision == "int8":
                held_out, words = acceleration.int8_held_out(self.metadata)
                if held_out is False or (held_out is None and self.tuning.requested == "auto"):
                    verdicts.append(f"int8 refused: {words}")
                    continue
                verdicts.append(words if held_out else f"int8 unproven: {words}")
                module = acceleration.int8_model(self.model, self.tuning.int8_engine)
            # As one batch and one by one: a kernel may go wrong for a shape it did not see first
            # (torch 2.14's aarch64 int8 on the onednn engine did, under emulation).
            outputs = self._run(module, check_items, precision)
            alone = [output for item in check_items for output in self._run(module, [item], precision)]
            ok, words = acceleration.accuracy_guard(precision, reference + reference, outputs + alone)
            verdicts.append(words)
            if ok:
                passed[precision] = module
        if len(passed) == 1:
            return "fp32", self.model, "; ".join(verdicts) + "; using fp32"
        if self.tuning.requested != "auto":
            ((precision, module),) = [(p, m) for p, m in passed.items() if p != "fp32"]
            return precision, module, "; ".join(reversed(verdicts))  # the guard's verdict first
        outcome = self.auto.decide(list(passed), lambda: auto_precision.fastest(
            lambda p: self._run(passed[p], check_items, p), list(passed)))
        return outcome.precision, passed[outcome.precision], outcome.words(len(check_items)) + "; " + "; ".join(verdicts)

    # -- one batch --------------------------------------------------------------------------------

    def handle(self, data: list, context: Any, enveloped: bool = False) -> list:
        if torchserve_wire.is_describe(context):
            # The archive's metadata, and the precision this worker chose (auto decides it at start).
            serving = {"precision": self.precision, "precision_why": self.precision_why}
            return [json.dumps({"model": self.model_name, **self.metadata, "serving": serving})]
        if enveloped:
            # KServe v1 instances / v2 inputs of ONE request are the batch; the envelope wraps our
            # list into one reply (status 200), so a failed instance carries its error body in place.
            instances = [row if isinstance(row, dict) else {"data": row} for row in data]
            replies, stages = self.answer([Payload.from_request(row) for row in instances])
            torchserve_wire.record_stage_metrics(context, vars(stages))
            return [reply.body for reply in replies]
        payloads = []
        for index, request in enumerate(data):
            headers = torchserve_wire.request_headers(context, index)
            if not torchserve_wire.arrived_over_http(headers):
                torchserve_wire.mark_complete_for_grpc(context, index)
            payloads.append(Payload.from_request(request, headers))
        replies, stages = self.answer(payloads)
        torchserve_wire.record_stage_metrics(context, vars(stages))
        for index, reply in enumerate(replies):
            if reply.status != 200:
                context.set_response_status(reply.status, reply.body["type"], index)
            context.set_response_content_type(index, "application/json")
        return [json.dumps(reply.body) for reply in replies]

    def answer(self, payloads: list[Payload]) -> tuple[list[Reply], StageSeconds]:
        """One reply per payload, in order: decode each alone, one forward, encode each alone;
        and the seconds each stage took."""
        stages = StageSeconds(items=len(payloads))
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
        stages.decode, stages.forward, stages.encode = decoded - started, forwarded - decoded, time.perf_counter() - forwarded
        return replies, stages

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
            if self.runner is self.model or not acceleration.is_compile_error(error):
                raise
            # A new input shape made the compiled model recompile, and that failed.
            self.runner = acceleration.eager(self.model, f"recompiling failed ({acceleration.one_line(error)})",
                                             self.model_name)
            return self._run(self.runner, items, precision or self.precision)

    def _run(self, runner: torch.nn.Module, items: list, precision: str) -> list:
        batch = acceleration.to_device(self.handler.collate(items), self.device)
        with torch.inference_mode(), acceleration.precision_mode(
                precision, self.device, self.tuning.fast_math, self.tuning.fpmath_env):
            rows = self.handler.postprocess(self.handler.forward(runner, batch), batch)
        if len(rows) != len(items):
            raise RuntimeError(f"{type(self.handler).__name__}.postprocess returned {len(rows)} outputs for {len(items)} items")
        return [acceleration.to_device(row, torch.device("cpu")) for row in rows]

    def _error_reply(self, index: int, error: Exception) -> Reply:
        kind = kind_of(error)
        # A RequestError's message is ours and holds no request content; the content is never logged.
        log.log(kind.log_level, "%s: request %d of batch answered %d %s", self.model_name, index, kind.status,
                type(error).__name__, exc_info=error if kind.status == 500 else None)
        return Reply(kind.status, error_body(error))
