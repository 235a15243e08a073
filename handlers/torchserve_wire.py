"""TorchServe's side of a worker: the ``handle(data, context)`` a handler module exposes, around
a ``handlers.lifecycle.Worker`` that knows nothing of TorchServe. Here is all TorchServe 0.12's
worker protocol asks beyond one answer per request: the worker's arguments from the context,
the customized describe call, request headers and statuses, gRPC's stream header, the KServe
service envelope, per-batch metrics, and the busy marker a draining server reads. Facts from
TorchServe's ``ts/`` sources.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from types import FrameType
from typing import Any, Callable

import torch

from handlers.launch import BUSY_DIR_VAR
from handlers.lifecycle import Worker
from handlers.model_handler import ModelHandler
from handlers.payload import Payload

log = logging.getLogger(__name__)


class TorchServeHandler:
    """The ``handle(data, context)`` callable a handler module exposes to TorchServe: called once
    with ``data=None`` when the worker starts, then once per batch of requests."""

    def __init__(self, make_handler: Callable[[], ModelHandler]):
        self.make_handler = make_handler
        self.worker: Worker | None = None
        self.busy: BusyMarker | None = None
        self.enveloped: bool | None = None  # decided on the first batch: the caller is fixed for the worker's life

    def __call__(self, data: Any, context: Any) -> Any:
        if self.worker is None:
            self.worker = worker_from_context(self.make_handler(), context)
            self.busy = BusyMarker()
            log.info("%s: ready on %s, pid %d", self.worker.model_name, self.worker.device, os.getpid())
        if data is None:
            return None
        if self.enveloped is None:
            self.enveloped = called_by_envelope(sys._getframe(1))
        with self.busy:
            return handle_batch(self.worker, data, context, self.enveloped)


def worker_from_context(handler: ModelHandler, context: Any) -> Worker:
    """The worker's plain arguments, from what TorchServe hands a handler at start."""
    properties = context.system_properties
    gpu_id = properties.get("gpu_id")
    device = f"cuda:{int(gpu_id)}" if gpu_id is not None and torch.cuda.is_available() else "cpu"
    serialized_file = (context.manifest or {}).get("model", {}).get("serializedFile")
    return Worker(handler, context.model_name, properties["model_dir"],
                  getattr(context, "model_yaml_config", None) or {}, device, serialized_file)


def handle_batch(worker: Worker, data: list, context: Any, enveloped: bool = False) -> list:
    """One TorchServe batch: one answer per request, each request's status and content type set."""
    if is_describe(context):
        return [json.dumps(worker.describe())]
    if enveloped:
        # KServe v1 instances / v2 inputs of ONE request are the batch; the envelope wraps our
        # list into one reply (status 200), so a failed instance carries its error body in place.
        instances = [row if isinstance(row, dict) else {"data": row} for row in data]
        replies, stages = worker.answer([Payload.from_request(row) for row in instances])
        record_stage_metrics(context, vars(stages))
        return [reply.body for reply in replies]
    payloads = []
    for index, request in enumerate(data):
        headers = request_headers(context, index)
        if not arrived_over_http(headers):
            mark_complete_for_grpc(context, index)
        payloads.append(Payload.from_request(request, headers))
    replies, stages = worker.answer(payloads)
    record_stage_metrics(context, vars(stages))
    for index, reply in enumerate(replies):
        if reply.status != 200:
            context.set_response_status(reply.status, reply.body["type"], index)
        context.set_response_content_type(index, "application/json")
    return [json.dumps(reply.body) for reply in replies]


def is_describe(context: Any) -> bool:
    """GET /models/<name>?customized=true: TorchServe sends one request with the header describe=True."""
    try:
        return context.get_request_header(0, "describe") == "True"
    except (AttributeError, IndexError, TypeError):
        return False


def request_headers(context: Any, index: int) -> dict:
    """Request ``index``'s headers: HTTP headers (str values) and, per input part, {"content-type": ...}."""
    try:
        return context.get_all_request_header(index) or {}
    except (AttributeError, IndexError, TypeError):
        return {}


def arrived_over_http(headers: dict) -> bool:
    # Requests over gRPC carry only the input parts' content types, no HTTP header.
    return any(isinstance(value, str) for value in headers.values())


def mark_complete_for_grpc(context: Any, index: int) -> None:
    """Without ts_stream_next=false, TorchServe 0.12's StreamPredictions hits a
    NullPointerException and kills the worker. (Over HTTP the same header would turn the reply
    into an unfinished chunked stream, so only gRPC requests get it.)"""
    context.set_response_header(index, "ts_stream_next", "false")


def called_by_envelope(caller: FrameType | None) -> bool:
    """True when TorchServe's service envelope (``service_envelope=kserve|kservev2`` in
    config.properties, or TS_SERVICE_ENVELOPE, as KServe sets it) called us: then ``data`` is the
    instances of one request, not one row per request. TorchServe tells the handler nothing else
    about it, so we ask the caller's frame: the envelope's ``handle`` calls us, as configured —
    never guessed from what a body looks like."""
    from ts.torch_handler.request_envelope.base import BaseEnvelope

    return caller is not None and isinstance(caller.f_locals.get("self"), BaseEnvelope)


class BusyMarker:
    """A file named by this worker's PID in GS_BUSY_DIR exists while it handles a batch, so a
    draining server knows what is still in flight. Unset (a stock TorchServe): a no-op."""

    def __init__(self) -> None:
        folder = os.environ.get(BUSY_DIR_VAR)
        self.path = Path(folder) / str(os.getpid()) if folder and Path(folder).is_dir() else None

    def __enter__(self):
        if self.path is not None:
            self.path.touch()
        return self

    def __exit__(self, *exc):
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        return False


# Per-batch stage times as TorchServe model metrics (Prometheus counters on the metrics port when
# metrics_mode=prometheus and model_metrics_auto_detect=true; lines in model_metrics.log otherwise):
# rate(seconds_total) / rate(batches_total) is a stage's time per batch, and
# rate(batch_items_total) / rate(batches_total) how full batches are.
STAGE_SECONDS_METRIC = "graviton_serve_stage_seconds_total"  # label Stage: decode, forward, encode
BATCHES_METRIC = "graviton_serve_batches_total"
BATCH_ITEMS_METRIC = "graviton_serve_batch_items_total"


def record_stage_metrics(context: Any, stages: dict[str, float]) -> None:
    """Add one batch's ``{"decode": s, "forward": s, "encode": s, "items": n}`` to the model's
    counters. No metrics cache on the context (a test's loader): nothing to do."""
    metrics = getattr(context, "metrics", None)
    if metrics is None:
        return
    from ts.metrics.dimension import Dimension
    from ts.metrics.metric_type_enum import MetricTypes

    for stage in ("decode", "forward", "encode"):
        metrics.add_metric(STAGE_SECONDS_METRIC, stages[stage], "Seconds", dimensions=[Dimension("Stage", stage)],
                           metric_type=MetricTypes.COUNTER)
    metrics.add_metric(BATCHES_METRIC, 1, "Count", dimensions=[], metric_type=MetricTypes.COUNTER)
    metrics.add_metric(BATCH_ITEMS_METRIC, stages["items"], "Count", dimensions=[], metric_type=MetricTypes.COUNTER)
