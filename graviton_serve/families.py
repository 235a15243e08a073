"""The model families this project serves: one entry each, the only place their operator-side
facts are written (in the spirit of torchvision's weights entries).

A family is one handler module in ``handlers/`` (what a .mar runs) plus what the operator side
needs to know about it: its task names, TorchServe's per-model settings it is served with, and a
sample request that shows it working. The demo store, ``cli`` (build commands, the curl and gRPC
lines ``scripts/serve`` prints), the bench and the tests read this table. The handler's own
settings and their defaults live in its ``settings`` (``handlers.settings.Setting``): an
archive's ``handler:`` section holds only what differs from them.

To add a family: a module in ``handlers/`` and an entry here (docs/architecture.md).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from graviton_serve.paths import ROOT
from graviton_serve.sample_data import photo

# TorchServe's per-model settings (model-config.yaml) every family starts from: one worker per
# model (it uses every core), TorchServe's batching with a short delay, and 300 s to start: a
# worker that times auto's precision starts alone, so the others' starts may wait for it
# (handlers.auto_precision; TorchServe's default is 120 s).
SERVING = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 5, "responseTimeout": 120,
           "startupTimeout": 300}


@dataclass(frozen=True)
class Sample:
    """A request that shows a model of the family working: a text, or a file sent as the body."""

    content_type: str
    text: str | None = None
    file: Callable[[], Path] | None = None

    def body(self) -> bytes:
        return self.text.encode() if self.text is not None else self.file().read_bytes()


@dataclass(frozen=True)
class Family:
    name: str  # the handler module: handlers/<name>.py is the .mar's handler
    task: str  # the field's term for what it does (Hugging Face / torchvision)
    aliases: tuple[str, ...]  # other task names users call it by (cli build-text --task)
    sample: Sample
    serving: dict = field(default_factory=lambda: dict(SERVING))  # TorchServe's per-model keys

    def model_config(self, **handler_settings) -> dict:
        """model-config.yaml for an archive of this family: TorchServe's keys and our
        ``handler:`` section (only the settings that differ from the handler's defaults)."""
        return {**self.serving, "handler": dict(handler_settings)}


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("text_classification", "text-classification", ("sentiment",),
               Sample("text/plain", text="I love riding in self-driving cars!")),
        Family("fill_mask", "fill-mask", (), Sample("text/plain", text="The capital of France is [MASK].")),
        Family("vision", "image-classification", ("resnet", "densenet"),
               Sample("image/jpeg", file=lambda: photo("flower"))),
        Family("mnist", "image-classification", ("digits",),
               Sample("image/png", file=lambda: ROOT / "tests" / "data" / "digit.png"),
               serving={**SERVING, "maxBatchDelay": 10, "responseTimeout": 30}),
    )
}


TEXT_FAMILIES = ("text_classification", "fill_mask")


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family '{name}'; known: {', '.join(FAMILIES)}") from None


def for_task(task: str) -> Family:
    """The text family serving ``task`` ("sentiment", "text-classification", "fill-mask")."""
    matches = [f for f in FAMILIES.values() if task in (f.task, *f.aliases) and f.name in TEXT_FAMILIES]
    if not matches:
        raise ValueError(f"unknown text task '{task}'; known: {', '.join(text_tasks())}")
    return matches[0]



def text_tasks() -> list[str]:
    return [name for f in map(family, TEXT_FAMILIES) for name in (*f.aliases, f.task)]


def of_archive(archive: Path) -> Family:
    """The family of a .mar, from its manifest's handler (never guessed from the model's name)."""
    with zipfile.ZipFile(archive) as mar:
        handler = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]["handler"]
    return family(Path(handler.split(":")[0]).stem)
