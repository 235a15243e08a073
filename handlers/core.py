"""The request lifecycle, owned once for every model.

A model module subclasses ``ModelHandler`` and says only what is its own: how to load the
model, how to turn one request into inputs (``decode``), how to batch them (``collate``), and
how to turn one output into JSON (``encode``). ``Worker`` does the rest: settings validated at
init, device and threads, one forward under inference mode for the whole batch, per-request
errors through the one table in ``handlers.errors``, and a response list that always has the
batch's length.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from handlers import tuning
from handlers.errors import RequestError, error_body
from handlers.launch import BUSY_DIR_VAR
from handlers.payload import Payload, one_of, positive_int

log = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"
SETTINGS_SECTION = "handler"  # the model-config.yaml section that belongs to our handlers


@dataclass(frozen=True)
class Setting:
    """One key a model accepts under ``handler:`` in its model-config.yaml."""

    default: Any
    parse: Callable[[Any], Any]


class ModelHandler:
    """What a model family defines. Subclasses override ``load``, ``decode`` and ``encode``."""

    #: keys accepted under ``handler:`` in model-config.yaml, each with its default and parser
    settings: dict[str, Setting] = {}

    def load(self, model_dir: Path, serialized_file: str | None, settings: dict) -> torch.nn.Module:
        raise NotImplementedError

    def decode(self, payload: Payload) -> Any:
        """One request's payload -> one item (its tensors and options). Raise RequestError."""
        raise NotImplementedError

    def collate(self, items: list) -> Any:
        """Items -> the model's batch input. Items are what ``decode`` returned."""
        return torch.stack([item.tensor for item in items])

    def forward(self, model: torch.nn.Module, batch: Any) -> Any:
        return model(batch)

    def split(self, outputs: Any, count: int) -> list:
        """The model's batch output -> one output per item, in order."""
        return list(outputs.unbind(0))

    def encode(self, output: Any, item: Any) -> Any:
        """One output -> a JSON-serialisable response."""
        raise NotImplementedError

    def check_payloads(self) -> list[Payload]:
        """The model's own check inputs: for the reduced-precision accuracy guard and to warm up a
        compiled model (none: neither is used)."""
        return []


def parse_compile(value: Any) -> str:
    """``handler.compile``: "off", or a torch.compile backend by name (e.g. "inductor")."""
    if value in (False, None, "off"):
        return "off"
    import torch._dynamo  # only when asked: it is slow to import

    backends = torch._dynamo.list_backends(exclude_tags=())
    if value not in backends:
        raise ValueError(f"expected 'off' or a torch.compile backend ({', '.join(torch._dynamo.list_backends())}), got {value!r}")
    return str(value)


# Keys every model accepts under ``handler:``, beside its own.
CORE_SETTINGS = {
    "precision": Setting("auto", one_of(*tuning.PRECISIONS)),
    "cores": Setting("shared", tuning.parse_cores),
    "compile": Setting("off", parse_compile),
    # Compiling must end well inside TorchServe's startup timeout (default 120 s), or eager it is.
    "compile_timeout_s": Setting(90, positive_int(3600)),
}
GUARD_AGREEMENT = 0.99  # reduced-precision top-1 must match fp32 on at least this share of check outputs
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def read_settings(model_yaml_config: dict | None, accepted: dict[str, Setting]) -> dict:
    """The ``handler:`` section of model-config.yaml, validated; every error names its key."""
    section = (model_yaml_config or {}).get(SETTINGS_SECTION) or {}
    if not isinstance(section, dict):
        raise ValueError(f"model-config.yaml: '{SETTINGS_SECTION}' must be a mapping")
    unknown = sorted(set(section) - set(accepted))
    if unknown:
        raise ValueError(
            f"model-config.yaml: unknown key '{SETTINGS_SECTION}.{unknown[0]}'; "
            f"accepted keys: {', '.join(sorted(accepted)) or 'none'}"
        )
    values = {}
    for key, setting in accepted.items():
        raw = section.get(key, setting.default)
        try:
            values[key] = setting.parse(raw)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"model-config.yaml: '{SETTINGS_SECTION}.{key}' is invalid: {exc}") from None
    return values


def _device(context: Any) -> torch.device:
    gpu_id = context.system_properties.get("gpu_id")
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda" and batch.device.type == "cpu":
            # Page-locked memory lets the copy run asynchronously (non_blocking needs it).
            return batch.pin_memory().to(device, non_blocking=True)
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


class Worker:
    """One model in one TorchServe worker process: built once at init, then serves batches."""

    def __init__(self, handler: ModelHandler, context: Any):
        properties = context.system_properties
        self.handler = handler
        self.model_name = context.model_name
        self.model_dir = Path(properties["model_dir"])
        self.settings = read_settings(getattr(context, "model_yaml_config", None), {**CORE_SETTINGS, **handler.settings})
        self.device = _device(context)
        workers = int((getattr(context, "model_yaml_config", None) or {}).get("minWorkers", 1) or 1)
        self.tuning = tuning.configure(self.model_name, self.device, self.settings["precision"],
                                       self.settings["cores"], workers)
        model_info = (context.manifest or {}).get("model", {})
        model = handler.load(self.model_dir, model_info.get("serializedFile"), self.settings)
        self.model = model.to(self.device).eval()
        self.runner = self.model  # what forwards run: the model, or its compiled form
        self.precision = "fp32"
        if self.tuning.precision != "fp32" or self.settings["compile"] != "off":
            # The model's own check inputs: decoded once for the precision guard and the compile warm-up.
            check_items = [handler.decode(payload) for payload in handler.check_payloads()]
            if self.tuning.precision != "fp32":
                self.precision, why = self._precision_guard(self.tuning.precision, check_items)
                log.info("%s: tuning: precision=%s (%s)", self.model_name, self.precision, why)
            if self.settings["compile"] != "off":
                self._compile(self.settings["compile"], self.settings["compile_timeout_s"], check_items)
        metadata_path = self.model_dir / METADATA_FILE
        self.metadata = json.loads(metadata_path.read_text()) if metadata_path.exists() else {}

    def handle(self, data: list, context: Any) -> list:
        if _is_describe(context):
            return [json.dumps({"model": self.model_name, **self.metadata})]
        if _is_enveloped(data, context):
            return self._handle_instances(data)
        responses: list = [None] * len(data)
        payloads: dict[int, Payload] = {}
        for index, request in enumerate(data):
            headers = _headers(context, index)
            if not _arrived_over_http(headers):
                # gRPC: mark each response complete. Without this header TorchServe 0.12's
                # StreamPredictions hits a NullPointerException and kills the worker. (Over HTTP
                # the same header would turn the reply into an unfinished chunked stream.)
                context.set_response_header(index, "ts_stream_next", "false")
            payloads[index] = Payload.from_request(request, headers)
        for index, (answer, error) in self._answer(payloads).items():
            if error is not None:
                body = error_body(error)
                context.set_response_status(body["code"], body["type"], index)
                answer = body
            responses[index] = json.dumps(answer)
            context.set_response_content_type(index, "application/json")
        return responses

    def _handle_instances(self, instances: list) -> list:
        """KServe v1 ``instances`` / v2 ``inputs``, as TorchServe's kserve/kservev2 envelope hands
        them over: the instances of one request are the batch, and the envelope wraps the list we
        return into one reply (v1 ``predictions``, v2 ``outputs``). A failed instance gets its
        error body in its place; the reply's status stays 200."""
        payloads = {index: Payload.from_request(instance if isinstance(instance, dict) else {"data": instance}, {})
                    for index, instance in enumerate(instances)}
        return [error_body(error) if error is not None else answer for answer, error in self._answer(payloads).values()]

    def _answer(self, payloads: dict[int, Payload]) -> dict[int, tuple[Any, BaseException | None]]:
        """index -> (JSON-ready answer, None) or (None, the error that index gets), in order.
        Decode each alone, one forward for the batch, encode each alone."""
        outcomes: dict[int, tuple[Any, BaseException | None]] = {}
        items: dict[int, Any] = {}
        for index, payload in payloads.items():
            try:
                items[index] = self.handler.decode(payload)
            except Exception as error:  # noqa: BLE001 - every error is answered per request
                outcomes[index] = (None, self._log_failure(index, error))
        for index, output in self._forward_isolating_oom(items).items():
            try:
                if isinstance(output, BaseException):
                    raise output
                outcomes[index] = (self.handler.encode(output, items[index]), None)
            except Exception as error:  # noqa: BLE001
                outcomes[index] = (None, self._log_failure(index, error))
        return dict(sorted(outcomes.items()))

    def _forward_isolating_oom(self, items: dict[int, Any]) -> dict[int, Any]:
        """index -> output, or the exception that index gets.

        One forward for the whole batch. If it runs out of memory, each item is retried alone,
        so only the item that does not fit gets its 507.
        """
        if not items:
            return {}
        try:
            return dict(zip(items, self._forward(list(items.values()))))
        except (MemoryError, torch.OutOfMemoryError) as error:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # give back what the failed batch left cached
            if len(items) == 1:
                return {index: error for index in items}
            log.warning("%s: out of memory on a batch of %d; retrying one by one", self.model_name, len(items))
            outcomes: dict[int, Any] = {}
            for index, item in items.items():
                outcomes.update(self._forward_isolating_oom({index: item}))
            return outcomes
        except Exception as error:  # noqa: BLE001 - a failed forward fails its batch, nothing more
            return {index: error for index in items}

    def _precision_guard(self, candidate_precision: str, items: list) -> tuple[str, str]:
        """The reduced precision if the model's check inputs keep their fp32 top-1, else fp32."""
        name = candidate_precision
        if not items:
            return "fp32", f"{name} refused: the model has no check inputs for the accuracy guard"
        reference = self._forward(items, "fp32")
        candidate = self._forward(items, name)
        agree = total = 0
        for expected, got in zip(reference, candidate):
            for a, b in zip(_tensors(expected), _tensors(got)):
                same = a.argmax(-1) == b.argmax(-1)
                agree, total = agree + int(same.sum()), total + same.numel()
        share = agree / max(1, total)
        if share >= GUARD_AGREEMENT:
            return name, f"accuracy guard passed: {name} top-1 agrees with fp32 on {share:.1%} of {total} check outputs"
        return "fp32", f"accuracy guard failed: {name} top-1 agrees with fp32 on only {share:.1%} of {total}; using fp32"

    def _compile(self, backend: str, timeout_s: int, items: list) -> None:
        """torch.compile, proven by a warm-up forward on the check inputs; any failure -> eager.

        Compiling happens at init, not on a user's first request, and a failure (no triton, no
        C++ compiler, a backend error, running past ``timeout_s``) costs one warning line, never
        the worker.
        """
        if not items:
            log.warning("%s: tuning: compile=%s skipped: no check inputs to compile and prove it on; eager", self.model_name, backend)
            return
        self.runner = torch.compile(self.model, backend=backend)
        try:
            with _deadline(timeout_s):
                self._forward(items, eager_on_compile_error=False)
        except BaseException as error:  # noqa: BLE001 - any failure to compile means eager
            if isinstance(error, KeyboardInterrupt):
                raise
            self._fall_back_to_eager(f"compile={backend} failed at init ({_one_line(error)})")
            return
        log.info("%s: tuning: compile=%s (warm-up on %d check inputs passed)", self.model_name, backend, len(items))

    def _fall_back_to_eager(self, why: str) -> None:
        import torch._dynamo

        self.runner = self.model
        torch._dynamo.reset()
        log.warning("%s: tuning: %s; running eager", self.model_name, why)

    def _forward(self, items: list, precision: str | None = None, eager_on_compile_error: bool = True) -> list:
        batch = _to_device(self.handler.collate(items), self.device)
        with torch.inference_mode(), self._precision_mode(precision or self.precision):
            try:
                outputs = self.handler.forward(self.runner, batch)
            except Exception as error:
                if self.runner is self.model or not eager_on_compile_error or not _is_compile_error(error):
                    raise
                # A new input shape made the compiled model recompile, and that failed.
                self._fall_back_to_eager(f"recompiling failed ({_one_line(error)})")
                outputs = self.handler.forward(self.runner, batch)
        rows = self.handler.split(outputs, len(items))
        if len(rows) != len(items):
            raise RuntimeError(f"{type(self.handler).__name__}.split returned {len(rows)} rows for {len(items)} items")
        return rows

    def _precision_mode(self, precision: str):
        if self.tuning.fast_math:
            # oneDNN runs this whole process's fp32 GEMMs and convolutions in bf16 (set at launch;
            # it cannot change once torch has started): bf16 is the default path, and fp32 means
            # keeping oneDNN out (exact fp32, slower convolutions).
            return contextlib.nullcontext() if precision == "bf16" else torch.backends.mkldnn.flags(enabled=False)
        dtype = AUTOCAST_DTYPES.get(precision)
        return torch.autocast(self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    def _log_failure(self, index: int, error: BaseException) -> BaseException:
        if isinstance(error, RequestError):
            # The message is ours and carries no request content; the content is never logged.
            log.info("%s: request %d of batch answered %d %s", self.model_name, index, error_body(error)["code"],
                     type(error).__name__)
        else:
            log.error("%s: request %d of batch failed", self.model_name, index, exc_info=error)
        return error


def _is_compile_error(error: BaseException) -> bool:
    return type(error).__module__.startswith(("torch._dynamo", "torch._inductor"))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:240]}"


class _deadline:
    """Raise TimeoutError in this (main) thread after ``seconds``; elsewhere, no limit."""

    def __init__(self, seconds: int):
        self.seconds = seconds
        self.armed = threading.current_thread() is threading.main_thread()

    def _expired(self, signum, frame):
        raise TimeoutError(f"took longer than {self.seconds}s")

    def __enter__(self):
        if self.armed:
            self.previous = signal.signal(signal.SIGALRM, self._expired)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        return False


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [tensor for value in output for tensor in _tensors(value)]
    if isinstance(output, dict):
        return [tensor for value in output.values() for tensor in _tensors(value)]
    return []


def _is_enveloped(data: list, context: Any) -> bool:
    """True when TorchServe's kserve/kservev2 envelope turned request 0 into a list of instances.
    KServe sets TS_SERVICE_ENVELOPE; without it: the batch is not one row per request, or a row
    is an instance rather than a request (a bare value, a v2 tensor description, or
    ``{"data": <text or numbers>}`` where a request over gRPC would carry bytes)."""
    if os.environ.get("TS_SERVICE_ENVELOPE", "").strip().lower() in ("kserve", "kservev2"):
        return True
    request_ids = getattr(context, "request_ids", None)
    if isinstance(request_ids, dict) and request_ids and len(request_ids) != len(data):
        return True
    return any(_is_instance(row) for row in data)


def _is_instance(row: Any) -> bool:
    if not isinstance(row, dict):
        return True
    if {"datatype", "shape"} <= row.keys():
        return True
    return set(row) == {"data"} and not isinstance(row["data"], (bytes, bytearray))


def _headers(context: Any, index: int) -> dict:
    try:
        return context.get_all_request_header(index) or {}
    except (AttributeError, IndexError, TypeError):
        return {}


def _arrived_over_http(headers: dict) -> bool:
    # TorchServe passes HTTP headers as str values beside each input part's {"content-type": ...};
    # requests that came over gRPC carry only the parts.
    return any(isinstance(value, str) for value in headers.values())


def _is_describe(context: Any) -> bool:
    # TorchServe's customized describe (GET /models/<name>?customized=true) sends one request
    # with the header describe=True.
    try:
        return context.get_request_header(0, "describe") == "True"
    except (AttributeError, IndexError, TypeError):
        return False


class _busy_marker:
    """``path`` exists while this worker handles a batch, so a draining server knows what is
    still in flight. ``path`` is None (a no-op) on a stock TorchServe, where the launch path's
    GS_BUSY_DIR is unset."""

    def __init__(self, path: Path | None):
        self.path = path

    def __enter__(self):
        if self.path is not None:
            self.path.touch()
        return self

    def __exit__(self, *exc):
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        return False


def _busy_path() -> Path | None:
    folder = os.environ.get(BUSY_DIR_VAR)
    return Path(folder) / str(os.getpid()) if folder and Path(folder).is_dir() else None


class EntryPoint:
    """The ``handle(data, context)`` callable TorchServe calls; the worker is built on the first call.

    TorchServe calls it once with ``data=None`` at load (our init), then once per batch.
    """

    def __init__(self, make_handler: Callable[[], ModelHandler]):
        self.make_handler = make_handler
        self.worker: Worker | None = None
        self.busy = _busy_marker(None)  # found once the worker starts

    def __call__(self, data: Any, context: Any) -> Any:
        if self.worker is None:
            self.worker = Worker(self.make_handler(), context)
            self.busy = _busy_marker(_busy_path())
            log.info("%s: ready on %s, pid %d", self.worker.model_name, self.worker.device, os.getpid())
        if data is None:
            return None
        with self.busy:
            return self.worker.handle(data, context)


def entry_point(make_handler: Callable[[], ModelHandler]) -> EntryPoint:
    return EntryPoint(make_handler)
