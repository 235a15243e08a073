"""A small gRPC client for TorchServe, on stubs generated from TorchServe's own protos.

The protos ship inside the installed torchserve (ts/frontend/model-server.jar);
``ensure_stubs`` generates Python stubs from them into graviton_serve/grpc_stubs/ at set-up
(git-ignored, never edited by hand). ``inference.proto`` imports google/rpc/status.proto, which
googleapis-common-protos provides.

    python -m graviton_serve.grpc_client predict mnist digit.png
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType

import grpc

from graviton_serve.paths import RUN_DIR
from graviton_serve.run_folder import RunFolder

STUBS_PACKAGE = "graviton_serve.grpc_stubs"
STUBS_DIR = Path(__file__).resolve().parent / "grpc_stubs"
PROTOS = ("inference.proto", "management.proto")


def _jar_path() -> Path:
    spec = importlib.util.find_spec("ts")
    if spec is None or spec.origin is None:
        raise RuntimeError("torchserve is not installed")
    return Path(spec.origin).parent / "frontend" / "model-server.jar"


def ensure_stubs(force: bool = False) -> Path:
    """Generate the stubs once (or again with ``force``); returns their folder."""
    if not force and all((STUBS_DIR / f"{Path(p).stem}_pb2_grpc.py").exists() for p in PROTOS):
        return STUBS_DIR
    from grpc_tools import protoc  # only needed at set-up

    import google.rpc  # googleapis-common-protos: provides google/rpc/status.proto

    googleapis_root = Path(google.rpc.__path__[0]).parents[1]
    well_known = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as work:
        # Placing the protos at graviton_serve/grpc_stubs/ makes the generated imports package-relative.
        proto_dir = Path(work) / STUBS_PACKAGE.replace(".", "/")
        proto_dir.mkdir(parents=True)
        with zipfile.ZipFile(_jar_path()) as jar:
            for name in PROTOS:
                (proto_dir / name).write_bytes(jar.read(name))
        STUBS_DIR.mkdir(exist_ok=True)
        arguments = [
            "grpc_tools.protoc", f"-I{work}", f"-I{googleapis_root}", f"-I{well_known}",
            f"--python_out={Path(work)}", f"--grpc_python_out={Path(work)}",
            *(str(proto_dir / name) for name in PROTOS),
        ]
        if protoc.main(arguments) != 0:
            raise RuntimeError("grpc_tools.protoc failed to generate TorchServe's stubs")
        for generated in proto_dir.glob("*.py"):
            (STUBS_DIR / generated.name).write_text(generated.read_text())
    (STUBS_DIR / "__init__.py").write_text('"""Generated from TorchServe\'s protos by grpc_client.ensure_stubs; do not edit."""\n')
    importlib.invalidate_caches()
    return STUBS_DIR


def _stub(name: str) -> ModuleType:
    ensure_stubs()
    return importlib.import_module(f"{STUBS_PACKAGE}.{name}")


class GrpcClient:
    """Inference (Ping, Predictions, StreamPredictions) and management (ListModels, DescribeModel)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        inference_port: int = 7070,
        management_port: int = 7071,
        inference_token: str | None = None,
        management_token: str | None = None,
        timeout: float = 60.0,
        max_message_bytes: int = 16 * 1024 * 1024,
    ):
        options = [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]
        self.inference_channel = grpc.insecure_channel(f"{host}:{inference_port}", options=options)
        self.management_channel = grpc.insecure_channel(f"{host}:{management_port}", options=options)
        self.inference = _stub("inference_pb2_grpc").InferenceAPIsServiceStub(self.inference_channel)
        self.management = _stub("management_pb2_grpc").ManagementAPIsServiceStub(self.management_channel)
        self.inference_token = inference_token
        self.management_token = management_token
        self.timeout = timeout

    @classmethod
    def from_key_file(cls, key_file: Path, **kwargs) -> "GrpcClient":
        keys = json.loads(Path(key_file).read_text())
        return cls(inference_token=keys["inference"]["key"], management_token=keys["management"]["key"], **kwargs)

    def close(self) -> None:
        self.inference_channel.close()
        self.management_channel.close()

    def __enter__(self) -> "GrpcClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _metadata(token: str | None) -> list[tuple[str, str]]:
        metadata = [("protocol", "gRPC")]
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        return metadata

    def _request(self, model: str, inputs: dict[str, bytes]):
        return _stub("inference_pb2").PredictionsRequest(model_name=model, input=inputs)

    def ping(self) -> str:
        empty = importlib.import_module("google.protobuf.empty_pb2").Empty()
        return self.inference.Ping(empty, timeout=self.timeout, metadata=self._metadata(self.inference_token)).health

    def predict(self, model: str, inputs: dict[str, bytes]) -> bytes:
        """One prediction; the input map's keys reach the handler as its request fields ("data" = body)."""
        response = self.inference.Predictions(
            self._request(model, inputs), timeout=self.timeout, metadata=self._metadata(self.inference_token)
        )
        return response.prediction

    def stream_predict(self, model: str, inputs: dict[str, bytes]) -> list[bytes]:
        responses = self.inference.StreamPredictions(
            self._request(model, inputs), timeout=self.timeout, metadata=self._metadata(self.inference_token)
        )
        return [response.prediction for response in responses]

    def list_models(self) -> dict:
        request = _stub("management_pb2").ListModelsRequest(limit=100)
        reply = self.management.ListModels(request, timeout=self.timeout, metadata=self._metadata(self.management_token))
        return json.loads(reply.msg)

    def describe_model(self, model: str, customized: bool = False) -> list:
        request = _stub("management_pb2").DescribeModelRequest(model_name=model, customized=customized)
        reply = self.management.DescribeModel(request, timeout=self.timeout, metadata=self._metadata(self.management_token))
        return json.loads(reply.msg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Call TorchServe over gRPC (token from the run folder's key file).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--inference-port", type=int, default=7070)
    parser.add_argument("--management-port", type=int, default=7071)
    parser.add_argument("--key-file", type=Path, default=RunFolder(RUN_DIR).key_file)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ping")
    commands.add_parser("list")
    describe = commands.add_parser("describe")
    describe.add_argument("model")
    for name in ("predict", "stream"):
        command = commands.add_parser(name)
        command.add_argument("model")
        command.add_argument("file", type=Path, nargs="?", help="the request body (an image, a text file, ...); - for stdin")
        command.add_argument("--text", help="a text to send as the body instead of a file")
        command.add_argument("--field", action="append", default=[], metavar="KEY=VALUE",
                             help="an extra request field, e.g. top_k=3")
    args = parser.parse_args(argv)
    if not args.key_file.exists():
        parser.error(f"no key file at {args.key_file}: is TorchServe running (scripts/serve)?")
    client = GrpcClient.from_key_file(
        args.key_file, host=args.host, inference_port=args.inference_port, management_port=args.management_port
    )
    try:
        if args.command == "ping":
            print(client.ping())
        elif args.command == "list":
            print(json.dumps(client.list_models(), indent=2))
        elif args.command == "describe":
            print(json.dumps(client.describe_model(args.model, customized=True), indent=2))
        else:
            if (args.text is None) == (args.file is None):
                parser.error("give either a file or --text")
            if args.text is not None:
                body = args.text.encode("utf-8")
            else:
                try:
                    body = sys.stdin.buffer.read() if str(args.file) == "-" else args.file.read_bytes()
                except OSError as error:
                    parser.error(f"cannot read {args.file}: {error.strerror or error}")
            inputs = {"data": body}
            for field in args.field:
                key, _, value = field.partition("=")
                inputs[key] = value.encode()
            replies = ([client.predict(args.model, inputs)] if args.command == "predict"
                       else client.stream_predict(args.model, inputs))
            failed = False
            for reply in replies:
                print(reply.decode("utf-8", errors="replace"))
                failed = failed or is_error_reply(reply)
            if failed:
                return 1  # TorchServe's gRPC carries no status: the error is in the body
    except grpc.RpcError as error:
        print(f"gRPC error {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


def is_error_reply(body: bytes) -> bool:
    """True for our error body ``{"code": 4xx/5xx, "type", "message"}``."""
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return isinstance(document, dict) and set(document) == {"code", "type", "message"} and document["code"] >= 400


if __name__ == "__main__":
    sys.exit(main())
