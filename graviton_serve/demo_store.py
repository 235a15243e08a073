"""The offline demo model store: every demo model built from what installed packages ship.

Built once and cached: trained weights under .cache/ (keyed by the training code), archives in
the model store (rebuilt when the handler code they carry changes).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from graviton_serve import demo_mnist, demo_text, demo_vision, int8_check
from graviton_serve.families import Family, family, for_task
from graviton_serve.archive import ArchiveSpec, build_archive, handler_sources, source_digest
from graviton_serve.paths import CACHE_DIR, ROOT
from graviton_serve.progress import say

STAMP_DIR = ".stamps"


@dataclass(frozen=True)
class DemoModel:
    name: str
    family: Family
    make: Callable[[Path], dict]  # writes the model's files into a folder, returns its metadata
    serialized_file: str  # the file of that folder TorchServe records as the serialized model
    training_sources: tuple[str, ...]  # repo paths whose change means making it again
    handler_settings: dict = field(default_factory=dict)  # the archive's handler: section

    @property
    def model_config(self) -> dict:
        return self.family.model_config(**self.handler_settings)


def state_dict_maker(train: Callable[[], tuple[torch.nn.Module, dict]], filename: str) -> Callable[[Path], dict]:
    """A ``make`` for models whose archive holds one torch state dict."""

    def make(folder: Path) -> dict:
        network, metadata = train()
        torch.save(network.state_dict(), folder / filename)
        return metadata

    return make


TEXT_SOURCES = ("graviton_serve/demo_text.py", "tests/data/clear_sentiment.tsv")  # training does not use the handler
TEXT_DEMOS = {
    "bert_sentiment": ("text_classification", demo_text.bert_sentiment),
    "roberta_sentiment": ("text_classification", demo_text.roberta_sentiment),
    "bert_fill_mask": ("fill_mask", demo_text.bert_fill_mask),
    "roberta_fill_mask": ("fill_mask", demo_text.roberta_fill_mask),
}

VISION_DEMOS = {"resnet50": "IMAGENET1K_V2", "densenet161": "IMAGENET1K_V1"}  # architecture -> weights entry
VISION_SOURCES = ("graviton_serve/demo_vision.py", "handlers/vision.py")

DEMO_MODELS: dict[str, DemoModel] = {
    "mnist": DemoModel(
        name="mnist",
        family=family("mnist"),
        make=state_dict_maker(demo_mnist.train, "mnist.pt"),
        serialized_file="mnist.pt",
        training_sources=("graviton_serve/demo_mnist.py", "handlers/mnist.py"),
    ),
    **{
        architecture: DemoModel(
            name=architecture,
            family=family("vision"),
            make=state_dict_maker(partial(demo_vision.random_network, architecture, weights), f"{architecture}.pt"),
            serialized_file=f"{architecture}.pt",
            training_sources=VISION_SOURCES,
            handler_settings={"architecture": architecture, "weights": weights},
        )
        for architecture, weights in VISION_DEMOS.items()
    },
    **{
        name: DemoModel(
            name=name,
            family=family(family_name),
            make=make,
            serialized_file="model.safetensors",
            training_sources=TEXT_SOURCES,
        )
        for name, (family_name, make) in TEXT_DEMOS.items()
    },
}


def _made_files(model: DemoModel) -> tuple[Path, dict]:
    """The model's files and metadata from the cache, made first when their code changed."""
    key = source_digest([ROOT / path for path in model.training_sources])
    folder = CACHE_DIR / "weights" / model.name / key
    metadata_file = folder / "metadata.json"  # written last: its presence means complete
    if metadata_file.exists():
        say(f"{model.name}: weights cached in {folder}")
        return folder, json.loads(metadata_file.read_text())
    say(f"{model.name}: making its weights (once; cached afterwards)")
    if folder.parent.exists():
        shutil.rmtree(folder.parent)  # older versions of this model
    folder.mkdir(parents=True)
    metadata = model.make(folder)
    metadata_file.write_text(json.dumps(metadata, indent=2))
    return folder, metadata


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
        sources = handler_sources() + [ROOT / path for path in (*model.training_sources, *int8_check.SOURCES)]
        stamp = {"sources": source_digest(sources), "model_config": model.model_config}
        if not force and archive.exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
            say(f"{name}: {archive.name} is up to date")
            built.append(archive)
            continue
        folder, metadata = _made_files(model)
        metadata = {**metadata, **int8_check.held_out_int8(name, folder)}
        say(f"{name}: packaging {archive.name}")
        extras = [path for path in sorted(folder.iterdir()) if path.name not in (model.serialized_file, "metadata.json")]
        spec = ArchiveSpec(name, model.family.name, folder / model.serialized_file, model.model_config,
                           {"model": name, **metadata}, extras)
        build_archive(spec, store)
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
        config = family("vision").model_config(architecture=architecture, weights=weights)
        spec = ArchiveSpec(name, "vision", state, config, {"model": name, **metadata})
        return build_archive(spec, store)


def build_text_archive(name: str, task: str, source: str, store: Path) -> Path:
    """A real text archive from a Hugging Face hub id (downloaded once) or a local folder:
    config, weights and tokenizer files packed so that serving needs no download."""
    from transformers import AutoTokenizer

    text_family = for_task(task)
    say(f"{name}: loading {source}")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = text_family_model_class(text_family).from_pretrained(source)
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


def text_family_model_class(text_family: Family):
    """The transformers Auto class the family's handler loads with (the handler says it)."""
    import importlib

    return importlib.import_module(f"handlers.{text_family.name}").handle.make_handler.auto_model
