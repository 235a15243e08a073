"""Entry points behind scripts/: set-up checks, the demo store, and serving.

    python -m graviton_serve.cli setup            # Java check + gRPC stubs
    python -m graviton_serve.cli build-store      # the offline demo model store (cached)
    python -m graviton_serve.cli serve [--stop | --foreground]
    python -m graviton_serve.cli aarch64-root [--optional]   # the emulated arm64 root (cached)
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import zipfile
from pathlib import Path

from graviton_serve.aarch64_root import NeedsRoot, RootError, ensure_root
from graviton_serve.bench import benchmark
from graviton_serve.bench_workloads import WORKLOADS, workloads
from graviton_serve.demo_store import DEMO_MODELS, build_demo_store, build_text_archive, build_vision_archive
from graviton_serve.entrypoint import serve_foreground
from graviton_serve.grpc_client import ensure_stubs
from graviton_serve.java import JavaNotFound, find_java_home
from graviton_serve.paths import CONFIG_FILE, MODEL_STORE, ROOT, RUN_DIR
from graviton_serve.progress import say
from graviton_serve.sample_data import photo
from graviton_serve.server import ConfigError, ServerError, TorchServe



SAMPLE_TEXTS = {"sentiment": "I love riding in self-driving cars!", "fill_mask": "The capital of France is [MASK]."}


def sample_input(model: str) -> str:
    """A file to try an image model with: a real digit, or a real photo that scikit-learn ships."""
    if model == "mnist":
        return "tests/data/digit.png"
    try:
        return str(photo("flower"))
    except FileNotFoundError:
        return "<an image file>"


def call_lines(server: TorchServe, name: str) -> list[str]:
    """One curl line and one gRPC line for a model."""
    url = server.url("inference", f"predictions/{name}")
    grpc = f"scripts/grpc-client --inference-port {server.ports.grpc_inference} predict {name}"
    text = next((t for kind, t in SAMPLE_TEXTS.items() if name.endswith(kind)), None)
    if text is not None:
        return [f"    curl -X POST {url} -H \"Authorization: Bearer $KEY\" -H 'Content-Type: text/plain' --data-binary '{text}'",
                f"    {grpc} --text '{text}'"]
    sample = sample_input(name)
    return [f"    curl -X POST {url} -H \"Authorization: Bearer $KEY\" -T {sample}", f"    {grpc} {sample}"]


def setup() -> None:
    say(f"java: {find_java_home()}")
    say(f"gRPC stubs: {ensure_stubs()}")


def archive_label(archive: Path) -> str:
    """' (UNTRAINED ...)' for an archive whose metadata says it was not trained."""
    try:
        with zipfile.ZipFile(archive) as mar:
            metadata = json.loads(mar.read("metadata.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return ""
    return "" if metadata.get("trained", True) else " (UNTRAINED demo: random weights, answers are meaningless)"


def usage_text(server: TorchServe) -> str:
    key_file = server.key_file
    inference_key = f"$(python3 -c 'import json;print(json.load(open(\"{key_file}\"))[\"inference\"][\"key\"])')"
    lines = [
        f"TorchServe is up (frontend pid {server.pid}); run folder {server.run_dir}",
        f"  token key file: {key_file}  (inference, management keys; sent as 'Authorization: Bearer <key>')",
        f"  logs: {server.log_dir}   metrics: {server.url('metrics', 'metrics')}",
        f"  KEY={inference_key}",
    ]
    for name in server.expected_models():
        lines += [f"  {name}{archive_label(server.model_store / f'{name}.mar')}:", *call_lines(server, name)]
    lines.append("  stop: scripts/serve --stop")
    return "\n".join(lines)


def serve(stop: bool, foreground: bool) -> int:
    server = TorchServe(RUN_DIR, MODEL_STORE, CONFIG_FILE)
    if stop:
        was_running = server.is_running()
        server.stop()
        say("TorchServe stopped" if was_running else "TorchServe was not running")
        return 0
    build_demo_store(MODEL_STORE)
    if server.is_running():
        say("TorchServe is already running")
        print(usage_text(server))
        return 0
    if foreground:
        return serve_foreground(server, on_ready=lambda: print(usage_text(server), flush=True))
    say(f"starting TorchServe: models {', '.join(server.expected_models())}")
    started = time.monotonic()
    server.start()
    say(f"every model READY {time.monotonic() - started:.1f}s after start")
    print(usage_text(server), flush=True)
    return 0


def build_aarch64_root(optional: bool) -> int:
    # Stopped (scripts/test stops it when the store build fails): unwind, so that what the build
    # mounted and registered is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        ensure_root()
    except NeedsRoot as error:
        if not optional:
            raise
        say(f"aarch64 root: not built: {error}; the aarch64 tests will be skipped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graviton_serve")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("setup", help="check Java and generate the gRPC stubs")
    build = commands.add_parser("build-store", help="build the offline demo model store (cached)")
    build.add_argument("models", nargs="*", help="default: every demo model (" + ", ".join(DEMO_MODELS) + ")")
    build.add_argument("--store", type=Path, default=MODEL_STORE)
    build.add_argument("--force", action="store_true", help="rebuild even when up to date")
    vision = commands.add_parser("build-vision", help="a ResNet/DenseNet archive with real weights")
    vision.add_argument("name", help="the served model name, e.g. densenet161")
    vision.add_argument("--architecture", required=True, help="torchvision builder: resnet50, densenet161, ...")
    vision.add_argument("--weights", default="DEFAULT", help="torchvision weights entry, e.g. IMAGENET1K_V2 (downloaded once)")
    vision.add_argument("--weights-file", type=Path, help="a local state-dict file instead of downloading")
    vision.add_argument("--store", type=Path, default=MODEL_STORE)
    text = commands.add_parser("build-text", help="a BERT/RoBERTa archive from a hub id or a local folder")
    text.add_argument("name", help="the served model name, e.g. bert_sentiment")
    text.add_argument("--task", required=True, choices=["sentiment", "fill-mask"])
    text.add_argument("--from", dest="source", required=True,
                      help="hub id (e.g. distilbert-base-uncased-finetuned-sst-2-english) or a folder with config + weights + tokenizer")
    text.add_argument("--store", type=Path, default=MODEL_STORE)
    bench = commands.add_parser("bench", help="ours against stock TorchServe and the raw forward, through real servers")
    bench.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    bench.add_argument("--concurrency", nargs="+", type=int, default=[1, 8], help="REST concurrencies (ours and stock)")
    bench.add_argument("--grpc-concurrency", nargs="*", type=int, default=[8], help="gRPC concurrencies (ours)")
    bench.add_argument("--requests", type=int, default=40, help="requests per workload, path and concurrency")
    bench.add_argument("--no-stock", action="store_true", help="skip the stock TorchServe reference")
    bench.add_argument("--no-limit", action="store_true", help="skip the raw-forward reference")
    bench.add_argument("--out", type=Path, default=ROOT / "docs" / "bench", help="where results.md, .json and the chart go")
    serve_parser = commands.add_parser("serve", help="serve every model of the model store")
    mode = serve_parser.add_mutually_exclusive_group()
    mode.add_argument("--stop", action="store_true", help="stop the server and wait until its processes exit")
    mode.add_argument("--foreground", action="store_true", help="stay in the foreground; SIGTERM stops cleanly")
    arm = commands.add_parser("aarch64-root", help="build the arm64 root the emulated aarch64 tests run in (cached; as root)")
    arm.add_argument("--optional", action="store_true", help="without root privileges, say so and exit 0 (the tests then skip)")
    args = parser.parse_args(argv)
    try:
        if args.command == "setup":
            setup()
        elif args.command == "build-store":
            build_demo_store(args.store, args.models or None, force=args.force)
        elif args.command == "bench":
            benchmark(workloads(args.workloads), args.concurrency, args.grpc_concurrency, args.requests, args.out,
                      with_stock=not args.no_stock, with_limit=not args.no_limit)
        elif args.command == "build-text":
            build_text_archive(args.name, args.task, args.source, args.store)
        elif args.command == "build-vision":
            build_vision_archive(args.name, args.architecture, args.weights, args.store, args.weights_file)
        elif args.command == "aarch64-root":
            return build_aarch64_root(args.optional)
        else:
            return serve(args.stop, args.foreground)
    except (JavaNotFound, ConfigError, ServerError, RootError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
