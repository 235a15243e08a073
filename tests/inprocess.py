"""Driving a handler through TorchServe's own Python loader and Service, without Java.

This is the worker's code path minus its socket: ModelLoader.load -> Service.predict, whose
binary reply (ts/protocol/otf_message_handler.create_predict_response) is decoded here.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.model_loader import ModelLoaderFactory

import ts


@dataclass
class Reply:
    status: int
    content_type: str
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


def load_model_dir(folder: Path, handler_file: Path, name: str, model_config: dict,
                   serialized_file: str | None = None):
    """Lay ``folder`` out as TorchServe unpacks a .mar (handler at the top, the handlers package
    beside it, model-config.yaml, manifest) and load it through TorchServe's loader."""
    import shutil

    import yaml

    from graviton_serve.paths import HANDLERS_DIR

    shutil.copytree(HANDLERS_DIR, folder / "handlers", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(handler_file, folder)
    (folder / "model-config.yaml").write_text(yaml.safe_dump(model_config))
    model = {"modelName": name, "handler": handler_file.name, "configFile": "model-config.yaml"}
    if serialized_file:
        model["serializedFile"] = serialized_file
    (folder / "MAR-INF").mkdir()
    (folder / "MAR-INF" / "MANIFEST.json").write_text(json.dumps({"model": model}))
    return folder


def load_service(model_dir: Path, handler: str, name: str = "model", batch_size: int = 8, gpu_id: int | None = None):
    model_dir = str(model_dir)
    if model_dir not in sys.path:
        sys.path.insert(0, model_dir)
    # A fresh import per load, as in a fresh worker process (the module holds its worker).
    sys.modules.pop(Path(handler.split(":")[0]).stem, None)
    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    service = ModelLoaderFactory.get_model_loader().load(
        name, model_dir, handler=handler, gpu_id=gpu_id, batch_size=batch_size,
        envelope=None, limit_max_image_pixels=True, metrics_cache=metrics,
    )
    service.set_cl_socket(None)
    return service


def request(value, content_type: str = "application/octet-stream", name: str = "body", headers: dict | None = None,
            **fields) -> dict:
    """One request as the frontend sends it; ``headers`` are HTTP headers (absent over gRPC)."""
    parameters = [{"name": name, "value": value, "contentType": content_type}]
    for key, field_value in fields.items():
        parameters.append({"name": key, "value": field_value, "contentType": "text/plain"})
    entry = {"requestId": b"", "parameters": parameters}
    if headers:
        entry["headers"] = [{"name": k.encode(), "value": v.encode()} for k, v in headers.items()]
    return entry


def predict(service, requests: list[dict]) -> list[Reply]:
    for number, entry in enumerate(requests):
        entry["requestId"] = str(number).encode()
    return _decode(service.predict(requests))


def _decode(message: bytes) -> list[Reply]:
    offset = 0

    def integer() -> int:
        nonlocal offset
        (value,) = struct.unpack_from("!i", message, offset)
        offset += 4
        return value

    def chunk() -> bytes:
        nonlocal offset
        length = integer()
        data = bytes(message[offset:offset + length])
        offset += length
        return data

    batch_code = integer()
    chunk()  # batch message
    replies = []
    while True:
        length = integer()
        if length == -1:
            return replies
        offset += length  # request id
        content_type = chunk().decode()
        status = integer()
        chunk()  # reason phrase
        headers = {chunk().decode(): chunk().decode() for _ in range(integer())}
        body = chunk()
        replies.append(Reply(status if batch_code == 200 else batch_code, content_type, headers, body))
