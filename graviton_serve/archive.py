"""Building self-contained .mar archives with torch-model-archiver.

Each archive carries: the model module as its handler (top level, as TorchServe imports it),
the whole ``handlers`` package beside it (the core the module imports), the weights,
``metadata.json`` (what the model is and how well it did; TorchServe's customized describe
returns it), and a model-config.yaml. It needs nothing of this project at serving time.

``build_vision_archive`` and ``build_text_archive`` pack real, downloaded models (``cli
build-vision`` / ``build-text``); the offline demos are built by ``graviton_serve.demo_store``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from graviton_serve.paths import HANDLERS_DIR
from graviton_serve.progress import say

# TorchServe's own per-model keys; ours live under "handler" (see handlers.settings.read_settings).
TORCHSERVE_MODEL_KEYS = {
    "minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout", "startupTimeout",
    "deviceType", "deviceIds", "parallelType", "parallelLevel", "jobQueueSize", "maxRetryTimeoutInSec",
    "retryTimeoutInSec", "useJobTicket", "continuousBatching", "handler",
}


@dataclass(frozen=True)
class ArchiveSpec:
    name: str  # the served model name
    handler_module: str  # a module in handlers/, e.g. "mnist"
    weights: Path  # the serialized file (state dict)
    model_config: dict  # model-config.yaml content
    metadata: dict  # metadata.json content
    extra_files: list[Path] = field(default_factory=list)  # more files for the archive root (tokenizer, config...)
    handler_file: Path | None = None  # a handler outside handlers/ (test models); default handlers/<handler_module>.py


def handler_sources() -> list[Path]:
    return sorted(HANDLERS_DIR.glob("*.py"))


def source_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def validate_model_config(name: str, config: dict) -> None:
    unknown = sorted(set(config) - TORCHSERVE_MODEL_KEYS)
    if unknown:
        raise ValueError(f"model-config for '{name}': unknown key '{unknown[0]}'")


def build_archive(spec: ArchiveSpec, export_dir: Path) -> Path:
    """Build ``<export_dir>/<name>.mar`` from ``spec``; returns its path."""
    validate_model_config(spec.name, spec.model_config)
    handler_file = spec.handler_file or HANDLERS_DIR / f"{spec.handler_module}.py"
    if not handler_file.exists():
        raise FileNotFoundError(f"no handler module {handler_file}")
    with tempfile.TemporaryDirectory(prefix=f"gs-build-{spec.name}-") as work:
        work_dir = Path(work)
        extras = work_dir / "extras"
        shutil.copytree(HANDLERS_DIR, extras / "handlers", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (extras / "metadata.json").write_text(json.dumps(spec.metadata, indent=2) + "\n")
        for extra in spec.extra_files:
            (shutil.copytree if extra.is_dir() else shutil.copy2)(extra, extras / extra.name)
        config_file = work_dir / "model-config.yaml"
        config_file.write_text(yaml.safe_dump(spec.model_config, sort_keys=False))
        return run_archiver(spec.name, spec.weights, handler_file, export_dir, extras=extras, config_file=config_file)


def unpack_archive(archive: Path, folder: Path) -> dict:
    """Unpack a .mar into ``folder`` as TorchServe does; returns its MANIFEST.json."""
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(folder)
    return json.loads((Path(folder) / "MAR-INF" / "MANIFEST.json").read_text())


def run_archiver(name: str, serialized_file: Path, handler: Path | str, export_dir: Path, extras: Path | str | None = None,
                 config_file: Path | None = None, model_file: Path | None = None) -> Path:
    """torch-model-archiver into ``<export_dir>/<name>.mar``; ``handler`` is a file or a TorchServe
    built-in handler name (the benchmark's stock references use ``image_classifier``)."""
    export_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"gs-archiver-{name}-") as archiver_tmp:
        command = [
            str(Path(sys.executable).with_name("torch-model-archiver")),
            "--model-name", name,
            "--version", "1.0",
            "--serialized-file", str(serialized_file),
            "--handler", str(handler),
            "--export-path", str(export_dir),
            "--force",
        ]
        for flag, value in (("--extra-files", extras), ("--config-file", config_file), ("--model-file", model_file)):
            if value is not None:
                command += [flag, str(value)]
        # The archiver stages in $TMPDIR/<name>: keep builds apart.
        result = subprocess.run(command, env={**os.environ, "TMPDIR": archiver_tmp}, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"torch-model-archiver failed for {name}:\n{result.stdout}{result.stderr}")
    return export_dir / f"{name}.mar"


def build_vision_archive(name: str, architecture: str, weights: str, store: Path, weights_file: Path | None = None) -> Path:
    """A real ResNet/DenseNet archive ``<store>/<name>.mar``: torchvision's pretrained weights
    entry ``weights`` (downloaded once by torch.hub) or a local state-dict file, packed so that
    serving needs no download. ValueError for an architecture or entry torchvision lacks."""
    import torch

    from graviton_serve.demos.vision import pretrained_network
    from graviton_serve.families import family

    network, metadata = pretrained_network(architecture, weights, weights_file)
    with tempfile.TemporaryDirectory() as work:
        state = Path(work) / f"{name}.pt"
        torch.save(network.state_dict(), state)
        say(f"{name}: packaging {name}.mar")
        config = family("vision").model_config(architecture=architecture, weights=weights)
        spec = ArchiveSpec(name, "vision", state, config, {"model": name, **metadata})
        return build_archive(spec, store)


def build_text_archive(name: str, task: str, source: str, store: Path) -> Path:
    """A real text archive ``<store>/<name>.mar`` for the text family serving ``task`` (e.g.
    "sentiment", "fill-mask"), from a Hugging Face hub id (downloaded once) or a local folder:
    config, weights and tokenizer files packed so that serving needs no download. ValueError for
    an unknown task."""
    from transformers import AutoTokenizer

    from graviton_serve.families import for_task

    text_family = for_task(task)
    say(f"{name}: loading {source}")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = text_family.handler_class.auto_model.from_pretrained(source)  # the Auto class its handler loads with
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        weights = folder / "model.safetensors"
        extras = [path for path in sorted(folder.iterdir()) if path != weights]
        metadata = {"model": name, "trained": True, "source": source, "task": text_family.task}
        say(f"{name}: packaging {name}.mar")
        spec = ArchiveSpec(name, text_family.name, weights, text_family.model_config(), metadata, extras)
        return build_archive(spec, store)


def archive_config(archive: Path) -> dict:
    """The archive's model-config.yaml, read from the zip ({} if it has none)."""
    with zipfile.ZipFile(archive) as mar:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
        config_name = manifest["model"].get("configFile")
        return (yaml.safe_load(mar.read(config_name)) or {}) if config_name else {}


def archive_workers(archive: Path) -> int:
    """How many workers the archive asks for (its ``minWorkers``; TorchServe's default 1 without one)."""
    return max(1, int(archive_config(archive).get("minWorkers", 1) or 1))
