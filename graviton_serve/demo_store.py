"""The offline demo model store: every demo model built from what installed packages ship.

Built once and cached: trained weights under .cache/ (keyed by the training code), archives in
the model store (rebuilt when the handler code they carry changes).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from functools import partial

from graviton_serve import demo_mnist, demo_vision
from graviton_serve.archive import ArchiveSpec, build_archive, handler_sources, source_digest
from graviton_serve.paths import CACHE_DIR, ROOT
from graviton_serve.progress import say

STAMP_DIR = ".stamps"


@dataclass(frozen=True)
class DemoModel:
    name: str
    handler_module: str
    train: Callable[[], tuple[torch.nn.Module, dict]]  # -> model, metadata
    training_sources: tuple[str, ...]  # repo paths whose change means retraining
    model_config: dict


def vision_model_config(architecture: str, weights: str) -> dict:
    """model-config.yaml for a ResNet/DenseNet archive (demo and real builds alike)."""
    return {
        "minWorkers": 1,
        "maxWorkers": 1,
        "batchSize": 8,
        "maxBatchDelay": 20,
        "responseTimeout": 120,
        "handler": {"architecture": architecture, "weights": weights, "top_k": 5, "max_image_pixels": 16_777_216},
    }


VISION_SOURCES = ("graviton_serve/demo_vision.py", "handlers/vision.py")

DEMO_MODELS: dict[str, DemoModel] = {
    "mnist": DemoModel(
        name="mnist",
        handler_module="mnist",
        train=demo_mnist.train,
        training_sources=("graviton_serve/demo_mnist.py", "handlers/mnist.py"),
        model_config={
            "minWorkers": 1,
            "maxWorkers": 1,
            "batchSize": 8,
            "maxBatchDelay": 10,
            "responseTimeout": 30,
            "handler": {"top_k": 5, "max_image_pixels": 16_777_216},
        },
    ),
    "resnet50": DemoModel(
        name="resnet50",
        handler_module="vision",
        train=partial(demo_vision.random_network, "resnet50", "IMAGENET1K_V2"),
        training_sources=VISION_SOURCES,
        model_config=vision_model_config("resnet50", "IMAGENET1K_V2"),
    ),
    "densenet161": DemoModel(
        name="densenet161",
        handler_module="vision",
        train=partial(demo_vision.random_network, "densenet161", "IMAGENET1K_V1"),
        training_sources=VISION_SOURCES,
        model_config=vision_model_config("densenet161", "IMAGENET1K_V1"),
    ),
}


def _trained_weights(model: DemoModel) -> tuple[Path, dict]:
    """Weights and metadata from the cache, training first when the training code changed."""
    key = source_digest([ROOT / path for path in model.training_sources])
    folder = CACHE_DIR / "weights" / model.name / key
    weights, metadata_file = folder / f"{model.name}.pt", folder / "metadata.json"
    if weights.exists() and metadata_file.exists():
        say(f"{model.name}: trained weights cached in {folder}")
        return weights, json.loads(metadata_file.read_text())
    say(f"{model.name}: making its weights (once; cached afterwards)")
    network, metadata = model.train()
    if folder.parent.exists():
        shutil.rmtree(folder.parent)  # older trainings of this model
    folder.mkdir(parents=True)
    torch.save(network.state_dict(), weights)
    metadata_file.write_text(json.dumps(metadata, indent=2))
    return weights, metadata


def build_demo_store(store: Path, names: list[str] | None = None, force: bool = False) -> list[Path]:
    """Build each demo archive into ``store`` unless an up-to-date one is there."""
    store.mkdir(parents=True, exist_ok=True)
    built = []
    for name in names or list(DEMO_MODELS):
        if name not in DEMO_MODELS:
            raise ValueError(f"unknown demo model '{name}'; known: {', '.join(DEMO_MODELS)}")
        model = DEMO_MODELS[name]
        archive = store / f"{name}.mar"
        stamp_file = store / STAMP_DIR / f"{name}.json"
        sources = handler_sources() + [ROOT / path for path in model.training_sources]
        stamp = {"sources": source_digest(sources), "model_config": model.model_config}
        if not force and archive.exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
            say(f"{name}: {archive.name} is up to date")
            built.append(archive)
            continue
        weights, metadata = _trained_weights(model)
        say(f"{name}: packaging {archive.name}")
        build_archive(ArchiveSpec(name, model.handler_module, weights, model.model_config, {"model": name, **metadata}), store)
        stamp_file.parent.mkdir(exist_ok=True)
        stamp_file.write_text(json.dumps(stamp))
        built.append(archive)
    return built


def build_vision_archive(name: str, architecture: str, weights: str, store: Path, weights_file: Path | None = None) -> Path:
    """A real ResNet/DenseNet archive: torchvision's pretrained weights (downloaded once by
    torch.hub) or a local state-dict file, packed so that serving needs no download."""
    network, metadata = demo_vision.pretrained_network(architecture, weights, weights_file)
    with tempfile.TemporaryDirectory() as work:
        state = Path(work) / f"{name}.pt"
        torch.save(network.state_dict(), state)
        say(f"{name}: packaging {name}.mar")
        spec = ArchiveSpec(name, "vision", state, vision_model_config(architecture, weights), {"model": name, **metadata})
        return build_archive(spec, store)
