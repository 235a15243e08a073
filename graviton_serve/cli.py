"""Entry points behind scripts/: set-up checks, the demo store, and serving.

    python -m graviton_serve.cli setup            # Java check + gRPC stubs
    python -m graviton_serve.cli build-store      # the offline demo model store (cached)
    python -m graviton_serve.cli serve [--stop | --foreground] [--engine ray]
    python -m graviton_serve.cli ray-config       # a Ray Serve config for your own Ray cluster
    python -m graviton_serve.cli bench [...]      # graviton_serve.bench

A command's modules are imported when that command runs (``serve --stop`` loads no torch).
(The emulated arm64 root is test tooling: ``python -m tests.tooling.aarch64_root``.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zipfile
from pathlib import Path

from graviton_serve.java import JavaNotFound
from graviton_serve.paths import CONFIG_FILE, MODEL_STORE, ROOT, RUN_DIR
from graviton_serve.progress import say
from graviton_serve.server import ServerError, TorchServe
from graviton_serve.torchserve_config import ConfigError
from handlers.cpu_features import CpuAsError

def call_lines(server: TorchServe, name: str) -> list[str]:
    """One curl line and one gRPC line for a model, from its family's sample request."""
    from graviton_serve.families import of_archive

    url = server.url("inference", f"predictions/{name}")
    grpc = f"scripts/grpc-client --inference-port {server.ports.grpc_inference} predict {name}"
    sample = of_archive(server.model_store / f"{name}.mar").sample
    if sample.text is not None:
        return [f"    curl -X POST {url} -H \"Authorization: Bearer $KEY\" -H 'Content-Type: {sample.content_type}' "
                f"--data-binary '{sample.text}'", f"    {grpc} --text '{sample.text}'"]
    try:
        path = sample.file()
    except FileNotFoundError:
        path = "<an image file>"
    return [f"    curl -X POST {url} -H \"Authorization: Bearer $KEY\" -T {path}", f"    {grpc} {path}"]


def setup() -> None:
    from graviton_serve.grpc_client import ensure_stubs
    from graviton_serve.java import find_java_home

    say(f"java: {find_java_home()}")
    say(f"gRPC stubs: {ensure_stubs()}")


def archive_label(archive: Path) -> str:
    """' (UNTRAINED ...)' for an archive whose metadata says it was not trained, ' (WEAK demo: ...)'
    for one whose metadata states its ``limitations``."""
    try:
        with zipfile.ZipFile(archive) as mar:
            metadata = json.loads(mar.read("metadata.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return ""
    if not metadata.get("trained", True):
        return " (UNTRAINED demo: random weights, answers are meaningless)"
    return f" (WEAK demo: {metadata['limitations']})" if metadata.get("limitations") else ""


def usage_text(server: TorchServe) -> str:
    key_file = server.run_folder.key_file
    inference_key = f"$(python3 -c 'import json;print(json.load(open(\"{key_file}\"))[\"inference\"][\"key\"])')"
    lines = [
        f"TorchServe is up (frontend pid {server.pid}); run folder {server.run_dir}",
        f"  token key file: {key_file}  (inference, management keys; sent as 'Authorization: Bearer <key>')",
        f"  logs: {server.run_folder.logs}   metrics: {server.url('metrics', 'metrics')}",
        f"  KEY={inference_key}",
    ]
    for name in server.expected_models():
        lines += [f"  {name}{archive_label(server.model_store / f'{name}.mar')}:", *call_lines(server, name)]
    lines.append("  stop: scripts/serve --stop")
    return "\n".join(lines)


def ray_usage_text(server) -> str:
    key = f"$(python3 -c 'import json;print(json.load(open(\"{server.key_file}\"))[\"inference\"][\"key\"])')"
    return (f"Ray Serve is up at {server.url()}; Ray's folder {server.folder}\n  KEY={key}\n"
            f"  curl -X POST {server.url('inference', 'predictions/mnist')} -H \"Authorization: Bearer $KEY\" "
            "-T tests/data/digit.png\n"
            "  (the same paths, bodies and answers as TorchServe's inference API; see the README's Ray Serve section)\n"
            "  stop: scripts/serve --engine ray --stop")


def serve(stop: bool, foreground: bool, engine: str = "torchserve") -> int:
    if engine == "ray":
        from graviton_serve.ray_server import RayServer

        if foreground:
            raise ServerError("--foreground is TorchServe's; on Ray, the cluster keeps running: stop it with --stop")
        server, name, usage = RayServer(RUN_DIR, MODEL_STORE, CONFIG_FILE), "Ray Serve", ray_usage_text
    else:
        server, name, usage = TorchServe(RUN_DIR, MODEL_STORE, CONFIG_FILE), "TorchServe", usage_text
    if stop:
        was_running = server.is_running()
        server.stop()
        say(f"{name} stopped" if was_running else f"{name} was not running")
        return 0
    from graviton_serve.demo_store import build_demo_store
    from graviton_serve.foreground import serve_foreground

    build_demo_store(MODEL_STORE)
    if server.is_running():
        say(f"{name} is already running")
        print(usage(server))
        return 0
    if foreground:
        return serve_foreground(server, on_ready=lambda: print(usage_text(server), flush=True))
    started = time.monotonic()
    if engine == "ray":
        server.start(say)
    else:
        say(f"starting TorchServe: models {', '.join(server.expected_models())}")
        server.start()
    say(f"every model READY {time.monotonic() - started:.1f}s after start")
    print(usage(server), flush=True)
    return 0


# -- commands: each one's arguments and what it runs (importing its modules only then) -------------

def build_store_arguments(parser: argparse.ArgumentParser) -> None:
    from graviton_serve.families import demos

    parser.add_argument("models", nargs="*", help="default: every demo model (" + ", ".join(demos()) + ")")
    parser.add_argument("--store", type=Path, default=MODEL_STORE)
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")


def build_store(args: argparse.Namespace) -> None:
    from graviton_serve.demo_store import build_demo_store

    build_demo_store(args.store, args.models or None, force=args.force)


def build_vision_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="the served model name, e.g. densenet161")
    parser.add_argument("--architecture", required=True, help="torchvision builder: resnet50, densenet161, ...")
    parser.add_argument("--weights", default="DEFAULT", help="torchvision weights entry, e.g. IMAGENET1K_V2 (downloaded once)")
    parser.add_argument("--weights-file", type=Path, help="a local state-dict file instead of downloading")
    parser.add_argument("--store", type=Path, default=MODEL_STORE)


def build_vision(args: argparse.Namespace) -> None:
    from graviton_serve.archive import build_vision_archive

    build_vision_archive(args.name, args.architecture, args.weights, args.store, args.weights_file)


def build_text_arguments(parser: argparse.ArgumentParser) -> None:
    from graviton_serve.families import text_tasks

    parser.add_argument("name", help="the served model name, e.g. bert_sentiment")
    parser.add_argument("--task", required=True, choices=text_tasks(), help="the text family to serve it with")
    parser.add_argument("--from", dest="source", required=True,
                        help="hub id (e.g. distilbert-base-uncased-finetuned-sst-2-english) or a folder with config + weights + tokenizer")
    parser.add_argument("--store", type=Path, default=MODEL_STORE)


def build_text(args: argparse.Namespace) -> None:
    from graviton_serve.archive import build_text_archive

    build_text_archive(args.name, args.task, args.source, args.store)


def bench_arguments(parser: argparse.ArgumentParser) -> None:
    from graviton_serve.bench.workloads import WORKLOADS

    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8], help="REST concurrencies (ours and stock)")
    parser.add_argument("--seconds", type=float, default=15, help="length of each REST cell (wrk)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of ours/stock cells, alternating (at least 3 for the README)")
    parser.add_argument("--grpc-concurrency", nargs="*", type=int, default=[8], help="gRPC concurrencies (ours, once)")
    parser.add_argument("--grpc-requests", type=int, default=40, help="requests per gRPC cell")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 4 s cells, 12 gRPC requests")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock TorchServe reference")
    parser.add_argument("--no-limit", action="store_true", help="skip the limits")
    parser.add_argument("--no-ray", action="store_true", help="skip ours on Ray Serve (path 'ray')")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench", help="where results.md, .json and the chart go")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("FIRST", "SECOND"),
                        help="no run: print how each figure's median (req/s, ms, ratios) moved between two runs' results.json, "
                             "flagging what moved beyond ±15%%")


def bench(args: argparse.Namespace) -> int | None:
    from graviton_serve.bench.run import benchmark
    from graviton_serve.bench.workloads import workloads

    if args.compare:
        from graviton_serve.bench.report import compare, read_results

        try:
            first, second = (read_results(path) for path in args.compare)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"first run: {args.compare[0]}; second run: {args.compare[1]}\n")
        print(compare(first, second))
        return 0
    if args.quick:
        args.seconds, args.rounds, args.grpc_requests = 4, 1, 12
    benchmark(workloads(args.workloads), args.concurrency, args.grpc_concurrency, args.grpc_requests, args.seconds,
              args.rounds, args.out, with_stock=not args.no_stock, with_limit=not args.no_limit, with_ray=not args.no_ray)


def ray_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, default=MODEL_STORE, help="the model store (a path every Ray node can read)")
    parser.add_argument("--key-file", type=Path, default=RUN_DIR / "ray" / "key_file.json",
                        help="the inference key, TorchServe's key_file.json shape (made if missing)")
    parser.add_argument("--replicas", type=int, default=None, help="replicas per model (default: its archive's minWorkers)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0,
                        help="a one-worker model's replica's CPUs (a model of N workers splits it between its N replicas)")
    parser.add_argument("--threads", type=int, default=0,
                        help="a one-worker model's replica's intra-op threads, split likewise (0: its CPUs)")
    parser.add_argument("--host", default="127.0.0.1", help="the HTTP proxy's address (0.0.0.0 in a container)")


def ray_config(args: argparse.Namespace) -> None:
    import yaml

    from graviton_serve.ray_cluster import serve_config, write_key_file
    from graviton_serve.torchserve_config import listen_address, read_properties
    from handlers.launch import launch_settings

    properties = read_properties(CONFIG_FILE)
    _, port = listen_address(properties, "inference_address")
    config = serve_config(sorted(args.store.resolve().glob("*.mar")), port, write_key_file(args.key_file.resolve()),
                          int(properties.get("max_request_size", 6553500)), args.replicas, args.cpus_per_replica,
                          args.threads, args.host, launch_settings())
    print(yaml.safe_dump(config, sort_keys=False), end="")


def serve_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--stop", action="store_true", help="stop the server and wait until its processes exit")
    mode.add_argument("--foreground", action="store_true", help="stay in the foreground; SIGTERM stops cleanly")
    parser.add_argument("--engine", choices=("torchserve", "ray"), default="torchserve",
                        help="torchserve (default), or ray: the same archives on Ray Serve (needs the 'ray' extra)")


# name: (help, its arguments, what it runs; a return value that is an int is the exit status)
COMMANDS = {
    "setup": ("check Java and generate the gRPC stubs", lambda parser: None, lambda args: setup()),
    "build-store": ("build the offline demo model store (cached)", build_store_arguments, build_store),
    "build-vision": ("a ResNet/DenseNet archive with real weights", build_vision_arguments, build_vision),
    "build-text": ("a BERT/RoBERTa archive from a hub id or a local folder", build_text_arguments, build_text),
    "bench": ("ours against stock TorchServe and the raw forward, through real servers", bench_arguments, bench),
    "ray-config": ("print a Ray Serve config (serve deploy) for the model store's archives", ray_config_arguments,
                   ray_config),
    "serve": ("serve every model of the model store", serve_arguments, lambda args: serve(args.stop, args.foreground, args.engine)),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="graviton_serve")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, arguments, _) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text)
        if argv[:1] == [name]:  # only the chosen command's arguments (and so its imports)
            arguments(command)
    args = parser.parse_args(argv)
    try:
        status = COMMANDS[args.command][2](args)
    except ModuleNotFoundError as error:
        if error.name not in ("ray", "starlette", "python_multipart"):
            raise
        print(f"error: {error.name} is not installed: pip install -e '.[ray]' (scripts/test installs it)", file=sys.stderr)
        return 1
    except (JavaNotFound, ConfigError, ServerError, CpuAsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
