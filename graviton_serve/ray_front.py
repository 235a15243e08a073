"""Ray Serve as a second front end for the same ``.mar`` archives and the same ``Worker``.

One Serve application per model, at the route prefix ``/predictions/<model>``, so a client that
called TorchServe changes only the address. A replica does what a TorchServe worker does at start:
it unpacks the archive, imports the archive's own handler module and builds the same
``handlers.lifecycle.Worker`` (settings, threads, precision and its guards). Per request it does
what TorchServe's frontend does before the worker sees it (``torchserve_request``: the body as
one part, or a multipart/form body split into parts, each part decoded by its content type as
TorchServe's worker decodes it), reads the body up to ``max_request_size``, checks the inference
token, and hands the request to Ray Serve's ``@serve.batch``; each batch is one ``Worker.answer``
(decode each, one forward, encode each, the one error table), run in a thread so the replica
keeps gathering the next batch meanwhile.

A small ``front`` application at ``/`` answers ``GET /ping`` and TorchServe-shaped 404s for
models that are not deployed. What differs from TorchServe (no gRPC, no management API, Ray's
metrics) is in the README's "Ray Serve" section.

Every argument comes from the Serve config ``graviton_serve.ray_cluster.serve_config`` writes;
ray is imported only here, so the TorchServe path never needs it (the ``ray`` extra).
"""

from __future__ import annotations

import asyncio
import hmac
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from ray import serve
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger(__name__)

# TorchServe 0.12's own answers for these, so clients see the same JSON from either engine.
TOKEN_ERROR = {"code": 400, "type": "InvalidKeyException",
               "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly"}
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
MAX_FORM_PARTS = 1000  # multipart parts and form fields per request


def error_response(status: int, error_type: str, message: str) -> Response:
    return json_response(status, {"code": status, "type": error_type, "message": message})


def json_response(status: int, body: Any) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def model_not_found(name: str) -> Response:
    return error_response(404, "ModelNotFoundException", f"Model not found: {name}")


# -- what TorchServe's frontend and worker make of one HTTP request ---------------------------------

class TooLarge(Exception):
    pass


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused (TooLarge) as soon as it passes ``max_bytes``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise TooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise TooLarge
    return bytes(body)


def decoded_part(value: bytes, content_type: str) -> Any:
    """A part's value as TorchServe 0.12's worker hands it to the handler
    (``ts/protocol/otf_message_handler._retrieve_input_data``): exactly application/json is
    parsed (bytes when invalid), text/* is a str when UTF-8, anything else stays bytes."""
    if content_type == "application/json":
        try:
            return json.loads(value.decode("utf-8"))
        except ValueError:
            return value
    if content_type.startswith("text"):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


async def torchserve_request(headers: Headers, body: bytes) -> tuple[dict, dict]:
    """(request, headers) as TorchServe 0.12 hands them to a handler for one HTTP request
    (frontend ``InferenceRequestHandler.parseRequest``, worker ``ts/service.py``): a multipart
    or urlencoded body becomes one part per field (plain fields as bytes with no content type,
    files with theirs), any other body the part ``body`` with the request's MIME type (no
    parameters); ``headers`` holds the HTTP headers and each part's ``{"content-type": ...}``.
    A multipart body that cannot be parsed: ValueError."""
    mime_type = headers.get("content-type", "").split(";")[0].strip()
    parts: list[tuple[str, bytes, str]] = []  # (name, value, content type)
    if mime_type.lower() in FORM_TYPES:
        async def stream():
            yield body
            yield b""
        if mime_type.lower() == FORM_TYPES[0]:
            parser = MultiPartParser(headers, stream(), max_files=MAX_FORM_PARTS, max_fields=MAX_FORM_PARTS,
                                     max_part_size=len(body) + 1)
        else:
            parser = FormParser(headers, stream())
        try:
            form = await parser.parse()
        except MultiPartException as error:
            raise ValueError(str(error)) from None
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                parts.append((name, await value.read(), value.content_type or "application/octet-stream"))
            else:
                parts.append((name, value.encode("utf-8"), ""))
    else:
        parts.append(("body", body, mime_type))
    request = {name: decoded_part(value, content_type) for name, value, content_type in parts}
    request_headers: dict[str, Any] = {name: {"content-type": content_type} for name, _, content_type in parts}
    request_headers.update(headers.items())
    return request, request_headers


# -- the model's deployment -------------------------------------------------------------------------

def unpack(archive: Path) -> tuple[Path, dict]:
    """The archive unpacked into a fresh temporary folder, as TorchServe does; (folder, MANIFEST.json)."""
    from graviton_serve.archive import unpack_archive

    folder = Path(tempfile.mkdtemp(prefix=f"gs-ray-{archive.stem}-"))
    return folder, unpack_archive(archive, folder)


def inference_key(key_file: str) -> str:
    """The inference key of a key file in TorchServe's shape; "" (no token check) without one."""
    return json.loads(Path(key_file).read_text())["inference"]["key"] if key_file else ""


def archive_worker(folder: Path, manifest: dict, model_name: str, device: str):
    """(the ``Worker`` the archive's own handler module makes, imported from ``folder`` as
    TorchServe's worker does; the archive's model-config.yaml). The checkout's ``handlers`` must not stand in for the archive's."""
    for module in [name for name in sys.modules if name == "handlers" or name.startswith("handlers.")]:
        del sys.modules[module]
    sys.path.insert(0, str(folder))
    handler_module = importlib.import_module(Path(manifest["model"]["handler"]).stem)
    from handlers.lifecycle import Worker  # the archive's, now first on sys.path

    make_handler = getattr(getattr(handler_module, "handle", None), "make_handler", None)
    if make_handler is None:
        raise ValueError(f"{model_name}: the archive's handler {manifest['model']['handler']} is not a graviton-serve "
                         "handler (no handle.make_handler); Ray Serve runs graviton-serve archives only")
    config_file = folder / manifest["model"].get("configFile", "model-config.yaml")
    config = yaml.safe_load(config_file.read_text()) if config_file.exists() else {}
    config = config or {}
    return Worker(make_handler(), model_name, folder, config, device, manifest["model"].get("serializedFile")), config


def log_to_stderr() -> None:
    """Our INFO lines (the tuning line, ready, per-request 4xx) to the replica's stderr, as a
    TorchServe worker writes them to its log; Ray keeps a replica's stderr in its worker-*.err."""
    for name in ("handlers", __name__):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


@serve.deployment
class TorchServeArchive:
    """One model from one ``.mar``: ``__call__`` answers ``POST /predictions/<model>``."""

    def __init__(self, archive: str, model_name: str, key_file: str, max_request_bytes: int):
        import ray

        log_to_stderr()
        self.model_name, self.max_request_bytes = model_name, max_request_bytes
        self.key = inference_key(key_file)
        self.folder, manifest = unpack(Path(archive))
        self.version = str(manifest["model"].get("modelVersion", "1.0"))
        device = "cuda:0" if ray.get_gpu_ids() else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES to the GPU it gave
        self.worker, config = archive_worker(self.folder, manifest, model_name, device)
        from handlers.payload import Payload  # the archive's, as the worker's

        self.payload_of = Payload.from_request
        # TorchServe's batching settings from the archive's model-config.yaml, for Serve's batcher.
        batch_size, batch_delay_ms = batching(config)
        self.answer_batch.set_max_batch_size(batch_size)
        self.answer_batch.set_batch_wait_timeout_s(batch_delay_ms / 1000)
        log.info("%s: ready on %s, pid %d (Ray Serve)", model_name, device, os.getpid())

    def __del__(self):
        shutil.rmtree(getattr(self, "folder", ""), ignore_errors=True)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def answer_batch(self, payloads: list) -> list:
        replies, _ = await asyncio.to_thread(self.worker.answer, payloads)
        return replies

    async def __call__(self, request: Request) -> Response:
        # As TorchServe behind the HTTP front: the body's size first (nginx), then the token.
        try:
            body = await read_body(request, self.max_request_bytes)
        except TooLarge:
            return error_response(413, "PayloadTooLarge", f"the body is over the limit of {self.max_request_bytes} "
                                                          "bytes of this server (max_request_size); send less")
        if not authorized(request, self.key):
            return json_response(400, TOKEN_ERROR)
        version = request.url.path.rstrip("/")[len(f"/predictions/{self.model_name}"):].lstrip("/")
        if version and version != self.version:  # /predictions/<model>/<version>: the archive's one version
            return error_response(404, "ModelVersionNotFoundException",
                                  f"Model version {version} does not exist for model {self.model_name}")
        try:
            parts, headers = await torchserve_request(request.headers, body)
        except ValueError:
            return error_response(400, "BadInput", "the multipart/form-data body cannot be parsed; "
                                                   "check its boundary and part headers")
        try:
            reply = await self.answer_batch(self.payload_of(parts, headers))
        except Exception:  # noqa: BLE001 - Worker.answer answers every request; this is our bug
            log.exception("%s: the batch failed outside the worker's error table", self.model_name)
            return error_response(500, "InternalError",
                                  "internal error in the model server; the replica log has the details")
        return json_response(reply.status, reply.body)


@serve.deployment
class Front:
    """``/``: ``GET /ping`` as TorchServe answers it, and TorchServe's 404 for any model not
    deployed; the token first, as TorchServe checks it first."""

    def __init__(self, key_file: str):
        self.key = inference_key(key_file)

    async def __call__(self, request: Request) -> Response:
        if not authorized(request, self.key):
            return json_response(400, TOKEN_ERROR)
        path = request.url.path.rstrip("/")
        if path == "/ping":
            return json_response(200, {"status": "Healthy"})
        if path.startswith("/predictions/"):
            return model_not_found(path.split("/")[2])
        return error_response(404, "ResourceNotFoundException", "Requested resource is not found, please refer to API document.")


def authorized(request: Request, key: str) -> bool:
    """``Authorization: Bearer <key>``, as TorchServe's token authorization reads it (no key: open)."""
    return not key or hmac.compare_digest(request.headers.get("authorization", ""), f"Bearer {key}")


def batching(config: dict) -> tuple[int, int]:
    """(batchSize, maxBatchDelay in ms) from a model-config.yaml, with TorchServe's defaults."""
    return int(config.get("batchSize", 1)), int(config.get("maxBatchDelay", 100))


def model_app(args: dict):
    """Serve's application builder for one archive: ``args`` = {archive, model_name, key_file,
    max_request_bytes}. A replica takes up to two batches at once: one in the forward, one gathering."""
    from graviton_serve.archive import archive_config

    batch_size, _ = batching(archive_config(Path(args["archive"])))
    return TorchServeArchive.options(name=args["model_name"], max_ongoing_requests=2 * batch_size).bind(
        str(args["archive"]), args["model_name"], args.get("key_file", ""), int(args["max_request_bytes"]))


def front_app(args: dict):
    """Serve's application builder for the front: ``args`` = {key_file}."""
    return Front.bind(args.get("key_file", ""))
