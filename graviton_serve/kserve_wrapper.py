"""KServe's ModelServer in front of TorchServe: what KServe's TorchServe runtime runs beside
``torchserve --start`` (TorchServe's own ``kubernetes/kserve/kserve_wrapper``), written against the
``kserve`` package (pyproject extra ``kserve``) instead of carried over.

    /opt/kserve/bin/python -m graviton_serve.kserve_wrapper    # started by graviton_serve.kserve_runtime

It reads TorchServe's config (``CONFIG_PATH``, default KServe's ``/mnt/models/config/config.properties``):
one KServe model per ``model_snapshot`` model, each forwarding to TorchServe's own KServe endpoints
(``/v1/models/<m>:predict`` under ``service_envelope=kserve``, ``/v2/models/<m>/infer`` under
``kservev2``). KServe's ModelServer serves REST v1/v2 on 8080 and gRPC v2 on 8081, as TorchServe's
wrapper does; a gRPC v2 call goes on to TorchServe over REST v2 (KServe converts both ways).

The protocol is KServe's ``PROTOCOL_VERSION`` (v1, v2, grpc-v2), else the one ``TS_SERVICE_ENVELOPE``
implies (kserve → v1, kservev2 → v2). Errors: a setting TorchServe's side cannot be served with is
named at start (exit 2). A request TorchServe refuses as a whole (4xx) is KServe's 400 with
TorchServe's message, TorchServe's 503 (queue full, worker down) KServe's 503; an instance
TorchServe refuses is answered in place inside a 200, as TorchServe's envelope puts it. In v2 each
element of a BYTES tensor is one item, answered in its place as the answer's JSON text
(``v2_rows``/``v2_outputs``); an empty request, a body for the other protocol, or data that does not
fit its datatype and shape is a 400 that names the input, never its data.

Only the standard library, ``kserve`` and this package's ``torchserve_config`` are imported: this
runs in its own venv (KServe's pins clash with TorchServe's side).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import urllib.request
from pathlib import Path

from graviton_serve.torchserve_config import ConfigError, listen_address, read_properties

KSERVE_CONFIG = Path("/mnt/models/config/config.properties")  # KServe's storage layout
# KServe's protocol names for TorchServe's envelopes; gRPC v2 reaches TorchServe as REST v2.
PROTOCOL_OF_ENVELOPE = {"kserve": "v1", "kservev2": "v2"}
PROTOCOLS = ("v1", "v2", "grpc-v2")
# KServe's ModelServer ports in the runtime (its defaults; TorchServe's wrapper uses the same).
WRAPPER_PORTS = (8080, 8081)


class SettingsError(ValueError):
    pass


def protocol_from_environment(environ: dict[str, str]) -> str:
    """KServe's protocol: PROTOCOL_VERSION, else what TS_SERVICE_ENVELOPE implies; errors name the variable."""
    protocol = environ.get("PROTOCOL_VERSION", "").strip()
    envelope = environ.get("TS_SERVICE_ENVELOPE", "").strip()
    if protocol and protocol not in PROTOCOLS:
        raise SettingsError(f"PROTOCOL_VERSION={protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    if envelope not in PROTOCOL_OF_ENVELOPE:
        raise SettingsError(f"TS_SERVICE_ENVELOPE={envelope!r}: expected kserve (protocol v1) or kservev2 (v2, "
                            f"grpc-v2); KServe sets it from the InferenceService's protocolVersion")
    implied = PROTOCOL_OF_ENVELOPE[envelope]
    if protocol and (protocol == "v1") != (implied == "v1"):
        raise SettingsError(f"PROTOCOL_VERSION={protocol} does not match TS_SERVICE_ENVELOPE={envelope} "
                            f"(which answers protocol {implied})")
    return protocol or implied


def torchserve_addresses(config: Path) -> tuple[str, str, list[str]]:
    """(inference host:port, management base URL, model names) from TorchServe's config, checked
    for what this wrapper needs: token auth off (TorchServe is reached on the pod's loopback only),
    and no TorchServe listener on the wrapper's own ports."""
    properties = read_properties(config)
    inference = listen_address(properties, "inference_address")
    management = listen_address(properties, "management_address")
    if properties.get("disable_token_authorization", "false").strip().lower() != "true":
        raise ConfigError(f"{config}: disable_token_authorization must be true for the KServe runtime: KServe's "
                          f"wrapper sends no TorchServe token (bind TorchServe to 127.0.0.1; KServe's ingress "
                          f"authenticates)")
    taken = {"inference_address": inference[1], "management_address": management[1],
             "metrics_address": listen_address(properties, "metrics_address")[1],
             "grpc_inference_port": int(properties.get("grpc_inference_port", "7070")),
             "grpc_management_port": int(properties.get("grpc_management_port", "7071"))}
    for key, port in taken.items():
        if port in WRAPPER_PORTS:
            raise ConfigError(f"{config}: {key} uses port {port}, which KServe's ModelServer listens on "
                              f"(REST {WRAPPER_PORTS[0]}, gRPC {WRAPPER_PORTS[1]}); move it (e.g. 8085, 8086)")
    models = list(json.loads(properties.get("model_snapshot", "{}") or "{}").get("models", {}))
    if not models:
        raise ConfigError(f"{config}: model_snapshot names no model (KServe's wrapper serves the snapshot's models)")
    host = "127.0.0.1" if inference[0] in ("0.0.0.0", "[::]") else inference[0]
    management_host = "127.0.0.1" if management[0] in ("0.0.0.0", "[::]") else management[0]
    return f"{host}:{inference[1]}", f"http://{management_host}:{management[1]}", models


def worker_ready(management_url: str, model: str) -> bool:
    """True if TorchServe's management API shows a READY worker for ``model``."""
    try:
        with urllib.request.urlopen(f"{management_url}/models/{model}", timeout=10) as reply:
            described = json.load(reply)
    except (OSError, ValueError):
        return False
    return any(worker.get("status") == "READY" for worker in described[0].get("workers", []))


def v2_rows(inputs: list[dict]) -> tuple[list[dict], list[int]]:
    """v2 inputs as the rows TorchServe's kservev2 envelope answers one each: a BYTES tensor of N
    elements (N images or texts) becomes N rows of shape [1] (the envelope would hand the handler
    the whole list as one item and answer once); any other tensor stays one row. Returns the rows
    and how many rows each input became (``v2_outputs`` joins their answers back)."""
    rows, counts = [], []
    for item in inputs:
        split = [{**item, "shape": [1], "data": [element]} for element in item["data"]]
        rows += split if item["datatype"] == "BYTES" else [item]
        counts.append(len(split) if item["datatype"] == "BYTES" else 1)
    return rows, counts


def v2_outputs(outputs: list[dict], inputs: list[dict], counts: list[int]) -> list[dict]:
    """TorchServe's answers to ``v2_rows``' rows joined back: one output per input, named after it,
    shape [N] for a BYTES tensor of N elements, each element the answer's JSON text (the protocol's
    BYTES are strings; KServe would turn an object into its Python repr)."""
    joined, start = [], 0
    for item, count in zip(inputs, counts):
        answers = [element for output in outputs[start:start + count] for element in output.get("data", [])]
        start += count
        joined.append({"name": item["name"], "datatype": "BYTES", "shape": [len(answers)],
                       "data": [answer if isinstance(answer, str) else json.dumps(answer) for answer in answers]})
    return joined


def v2_inputs(request) -> list[dict]:
    """A KServe ``InferRequest`` (v2 REST or gRPC, where BYTES arrive as raw bytes) as v2 JSON
    inputs, BYTES elements as UTF-8 text. Errors: InvalidInput naming the input (never its data)."""
    from kserve.errors import InvalidInput

    if not request.inputs:
        raise InvalidInput("the request has no inputs: send at least one in \"inputs\"")
    inputs = []
    for item in request.inputs:
        try:
            data = item.as_numpy().flatten().tolist()
            data = [element.decode() if isinstance(element, bytes) else element for element in data]
        except UnicodeDecodeError:
            raise InvalidInput(f"input {item.name!r}: BYTES elements must be UTF-8 text (base64 for images)") from None
        except (ValueError, TypeError):
            raise InvalidInput(f"input {item.name!r}: its data does not fit datatype {item.datatype} and shape "
                               f"{list(item.shape)}") from None
        if not data:
            raise InvalidInput(f"input {item.name!r} is empty: send at least one element")
        inputs.append({"name": item.name, "shape": list(item.shape), "datatype": item.datatype, "data": data})
    return inputs


def v1_json(body: bytes | str) -> dict:
    """A v1 body KServe did not decode (sent without Content-Type: application/json, as ``curl -d``
    sends it) read as JSON. Errors: InvalidInput saying what to send."""
    from kserve.errors import InvalidInput

    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("the body is not JSON: send {\"instances\": [...]} as application/json") from None
    if not isinstance(payload, dict):
        raise InvalidInput("the body is JSON but not an object: send {\"instances\": [...]}")
    return payload


def serve(config: Path, protocol: str) -> None:
    import httpx
    from kserve import Model, ModelServer
    from kserve.errors import InvalidInput, ModelNotReady
    from kserve.protocol.infer_type import InferRequest, InferResponse

    predictor_host, management_url, names = torchserve_addresses(config)
    client = httpx.AsyncClient(base_url=f"http://{predictor_host}", timeout=600)

    class TorchServeModel(Model):
        """One TorchServe model behind KServe's ModelServer: each request goes to TorchServe's
        KServe endpoint for the protocol (v1 body as it came; v2 and gRPC v2 as v2 JSON)."""

        def load(self) -> bool:
            self.ready = worker_ready(management_url, self.name)
            return self.ready

        async def predict(self, payload, headers=None, response_headers=None):
            if protocol == "v1":
                if isinstance(payload, (bytes, str)):  # JSON sent without its type (curl -d): KServe passes the bytes
                    payload = v1_json(payload)
                if not isinstance(payload, dict):
                    raise InvalidInput(f"this runtime serves KServe protocol v1 (TS_SERVICE_ENVELOPE=kserve): POST "
                                       f"{{\"instances\": [...]}} to /v1/models/{self.name}:predict")
                if not isinstance(payload.get("instances"), list) or not payload["instances"]:
                    raise InvalidInput("a v1 request needs \"instances\": a list of at least one instance")
                return await self.call(f"/v1/models/{self.name}:predict", payload)
            if isinstance(payload, dict):
                raise InvalidInput(f"this runtime serves KServe protocol v2 (TS_SERVICE_ENVELOPE=kservev2): POST "
                                   f"{{\"inputs\": [...]}} to /v2/models/{self.name}/infer, or use gRPC v2")
            request = payload if isinstance(payload, InferRequest) else InferRequest.from_grpc(payload)
            inputs = v2_inputs(request)
            rows, counts = v2_rows(inputs)
            answer = await self.call(f"/v2/models/{self.name}/infer", {"id": request.id, "inputs": rows})
            answer["outputs"] = v2_outputs(answer.get("outputs", []), inputs, counts)
            return InferResponse.from_rest(answer)

        async def call(self, path: str, body: dict) -> dict:
            reply = await client.post(path, json=body)
            if 400 <= reply.status_code < 500:  # the client's request as a whole, as TorchServe judged it
                raise InvalidInput(f"TorchServe answered {reply.status_code}: {reply.text[:500]}")
            if reply.status_code == 503:  # TorchServe's queue is full or its worker is down: retry later
                busy = ModelNotReady(self.name, f"TorchServe answered 503: {reply.text[:500]}")
                busy.reason = str(busy)  # KServe's gRPC error path reads .reason, which ModelNotReady lacks
                raise busy
            reply.raise_for_status()  # any other status is a fault on the server's side: KServe's 500
            return reply.json()

    models = [TorchServeModel(name) for name in names]
    for model in models:
        model.load()
    not_ready = [model.name for model in models if not model.ready]
    if not_ready:
        raise SettingsError(f"TorchServe has no READY worker for {', '.join(not_ready)} at {management_url}")
    logging.info("KServe wrapper: %s over protocol %s, TorchServe at %s", ", ".join(names), protocol, predictor_host)
    ModelServer().start(models)


def main() -> int:
    logging.basicConfig(level=logging.INFO)
    try:
        protocol = protocol_from_environment(dict(os.environ))
        serve(Path(os.environ.get("CONFIG_PATH") or KSERVE_CONFIG), protocol)
    except (SettingsError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
