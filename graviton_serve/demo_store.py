"""The offline demo model store: every demo model built from what installed packages ship.

Built once and cached: trained weights under .cache/ (keyed by the training code), archives in
the model store (rebuilt when the handler code they carry changes).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from graviton_serve import demo_mnist
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
}


def _trained_weights(model: DemoModel) -> tuple[Path, dict]:
    """Weights and metadata from the cache, training first when the training code changed."""
    key = source_digest([ROOT / path for path in model.training_sources])
    folder = CACHE_DIR / "weights" / model.name / key
    weights, metadata_file = folder / f"{model.name}.pt", folder / "metadata.json"
    if weights.exists() and metadata_file.exists():
        say(f"{model.name}: trained weights cached in {folder}")
        return weights, json.loads(metadata_file.read_text())
    say(f"{model.name}: training (once; cached afterwards)")
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
        spec = ArchiveSpec(
            name=name,
            handler_module=model.handler_module,
            weights=weights,
            model_config=model.model_config,
            metadata={"model": name, **metadata},
        )
        build_archive(spec, store)
        stamp_file.parent.mkdir(exist_ok=True)
        stamp_file.write_text(json.dumps(stamp))
        built.append(archive)
    return built
