"""The model families this project serves: one entry each, the only place their operator-side
facts are written (in the spirit of torchvision's weights entries).

A family is one handler module (``handlers/<name>.py``: what a .mar runs) plus what the operator
side needs to know about it: its task names, TorchServe's per-model settings it is served with,
a sample request that shows it working, and its demo models (how each is made, by a recipe in
``graviton_serve/demos/``). What the handler class says is read from it, never written again
here: whether the family is a text one (its class subclasses ``handlers.text.TextHandler``) and
whether it offers int8 (``offers_int8``). The demo store, the int8 check, ``cli`` (build commands,
the curl and gRPC lines ``scripts/serve`` prints), the bench and the tests read this table. The
handler's own settings and their defaults live in its ``settings``
(``handlers.settings.Setting``): an archive's ``handler:`` section holds only what differs.

Handler modules and recipes are imported when first asked for (``Family.handler_class``,
``resolve``), never when this module is: ``cli`` commands that need no torch stay fast.

To add a family: its handler module and an entry here; with a demo model, also its recipe
(3 files; docs/architecture.md, tests/test_new_family.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import zipfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Callable

from graviton_serve.paths import HANDLERS_DIR, ROOT
from graviton_serve.sample_data import photo

# TorchServe's per-model settings (model-config.yaml) every family starts from: one worker per
# model (it uses every core), TorchServe's batching with a 1 ms delay, and 300 s to start: a
# worker that times auto's precision starts alone, so the others' starts may wait for it
# (handlers.auto_precision; TorchServe's default is 120 s). The delay is what a lone request waits
# for company: 5 ms put ResNet50's c1 p50 at 76-80 ms against stock's 73; 1 ms gave 74 ms and no
# loss at c8 (17.3-17.8 -> 18.2-18.3 req/s in one start each, batches of 4.8 instead of 7.3: a CPU
# forward costs about the same per item either way).
SERVING = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 1, "responseTimeout": 120,
           "startupTimeout": 300}
# Light models (a batch in a few ms to tens of ms) run as two workers splitting the CPUs' threads,
# each with half the batch: one computes while the other's batch makes its round trip through the
# frontend, which a single worker waits out idle. Given per family: MNIST, the text classifiers
# (the sentiment models, and the bench's BERT-base built on this family), efficientnet_lite0.
# Measured with scripts/bench's workloads (AMD EPYC Zen 4, 2 cores, wrk c8, 8 s cells;
# docs/bench/breakdown.md): bert_sentiment 152-186 -> 195-222 req/s (delay 5 ms), MNIST 553-1010
# (four starts) -> 839-1137 (delay 10 ms), efficientnet_lite0 62-72 -> 103 req/s (its JPEG decode,
# 6.5 ms a photo on one core, overlaps the other worker's forward; c1 p50 24 -> 27 ms). Their
# delay is 2 ms: at 10 ms a lone MNIST request waited for company (c2 p50 16 ms; 6 ms at c1 with
# 2 ms, c8 975-1066 req/s), at 5 ms bert_sentiment's c1 p50 was 21 ms, 18 at 2 ms (one worker of
# two threads: 17 ms).
TWO_WORKERS = {"minWorkers": 2, "maxWorkers": 2, "batchSize": 4, "maxBatchDelay": 2}


def resolve(reference: str) -> Any:
    """What a ``"package.module:attribute"`` reference names, its module imported now."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Sample:
    """A request that shows a model of the family working: a text, or a file sent as the body."""

    content_type: str
    text: str | None = None
    file: Callable[[], Path] | None = None

    def body(self) -> bytes:
        return self.text.encode() if self.text is not None else self.file().read_bytes()


@dataclass(frozen=True)
class Demo:
    """A demo model of a family, built offline into the demo store (graviton_serve.demo_store).

    ``recipe`` and ``evaluation`` are ``"module:function"`` references (graviton_serve.demos):
    ``recipe(demo, folder) -> metadata`` writes the model's files into ``folder``;
    ``evaluation(demo, folder) -> demos.Evaluation`` is the held-out metric the int8 check
    scores fp32 and int8 with (None: no held-out data, no int8 check).
    """

    name: str  # the served model name (<name>.mar)
    recipe: str
    serialized_file: str  # the recipe's file TorchServe records as the serialized model, or a "module:CONSTANT" naming it
    sources: tuple[str, ...]  # repo paths whose change means making it again (the weights cache's key)
    handler_settings: dict = field(default_factory=dict)  # the archive's handler: section
    recipe_settings: dict = field(default_factory=dict)  # the recipe's knobs for this demo (its data budget)
    evaluation: str | None = None

    @property
    def serialized_file_name(self) -> str:
        return resolve(self.serialized_file) if ":" in self.serialized_file else self.serialized_file


@dataclass(frozen=True)
class Family:
    name: str  # the handler module: handlers/<name>.py is the .mar's handler
    task: str  # the field's term for what it does (Hugging Face / torchvision)
    aliases: tuple[str, ...]  # other task names users call it by (cli build-text --task)
    sample: Sample
    serving: dict = field(default_factory=lambda: dict(SERVING))  # TorchServe's per-model keys
    demos: tuple[Demo, ...] = ()  # its demo models, in the order the store builds them
    handler_file: Path | None = None  # a handler module outside handlers/ (a test's family)

    @property
    def handler_path(self) -> Path:
        """The module a .mar of this family runs: handlers/<name>.py unless ``handler_file``."""
        return self.handler_file or HANDLERS_DIR / f"{self.name}.py"

    @property
    def handler_class(self) -> type:
        """The ModelHandler subclass the module serves (its ``handle``'s), imported now."""
        return _handler_module(self.handler_path).handle.make_handler

    @property
    def is_text(self) -> bool:
        from handlers.text import TextHandler

        return issubclass(self.handler_class, TextHandler)

    @property
    def offers_int8(self) -> bool:
        return self.handler_class.offers_int8

    def model_config(self, **handler_settings) -> dict:
        """model-config.yaml for an archive of this family: TorchServe's keys and our
        ``handler:`` section (only the settings that differ from the handler's defaults)."""
        return {**self.serving, "handler": dict(handler_settings)}


@cache
def _handler_module(path: Path):
    if path.parent == HANDLERS_DIR:
        return importlib.import_module(f"handlers.{path.stem}")
    spec = importlib.util.spec_from_file_location(f"graviton_serve_family_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# What every demo's weights depend on besides its recipe: the seed (graviton_serve/demos/__init__.py).
DEMO_SOURCES = ("graviton_serve/demos/__init__.py",)
TEXT_SOURCES = (*DEMO_SOURCES, "graviton_serve/demos/corpus.py", "graviton_serve/demos/roberta.py",
                "tests/data/clear_sentiment.tsv")  # training does not use the handler


def _text_demo(name: str, task_module: str, **budget) -> Demo:
    """A text demo: its recipe ``graviton_serve.demos.<task_module>:<name>``, and its data budget
    (graviton_serve.demos.corpus.Budget)."""
    module = f"graviton_serve.demos.{task_module}"
    return Demo(name, f"{module}:{name}", "model.safetensors", (*TEXT_SOURCES, f"{module.replace('.', '/')}.py"),
                recipe_settings=budget, evaluation=f"{module}:held_out_evaluation")


def _untrained_vision_demo(architecture: str, weights: str) -> Demo:
    """Random weights (no ImageNet weights offline); preprocessing and categories from ``weights``."""
    return Demo(architecture, "graviton_serve.demos.vision:make_untrained", f"{architecture}.pt",
                (*DEMO_SOURCES, "graviton_serve/demos/vision.py", "handlers/vision.py"),
                {"architecture": architecture, "weights": weights})


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (  # in the order the demo store builds their demos
        Family("mnist", "image-classification", ("digits",),
               Sample("image/png", file=lambda: ROOT / "tests" / "data" / "digit.png"),
               serving={**SERVING, **TWO_WORKERS, "responseTimeout": 30},
               demos=(Demo("mnist", "graviton_serve.demos.mnist:make", "handlers.mnist:WEIGHTS_FILE",
                           (*DEMO_SOURCES, "graviton_serve/demos/mnist.py", "handlers/mnist.py"),
                           evaluation="graviton_serve.demos.mnist:held_out_evaluation"),)),
        Family("vision", "image-classification", ("resnet", "densenet"),
               Sample("image/jpeg", file=lambda: photo("flower")),
               demos=(_untrained_vision_demo("resnet50", "IMAGENET1K_V2"),
                      _untrained_vision_demo("densenet161", "IMAGENET1K_V1"))),
        Family("timm_vision", "image-classification", ("efficientnet",),
               Sample("image/jpeg", file=lambda: photo("flower")), serving={**SERVING, **TWO_WORKERS},
               demos=(Demo("efficientnet_lite0", "graviton_serve.demos.vision:make_efficientnet_lite0",
                           "efficientnet_lite0.pt",
                           (*DEMO_SOURCES, "graviton_serve/demos/vision.py", "handlers/timm_vision.py"),
                           {"architecture": "tf_efficientnet_lite0"}),)),
        # Text demos' budgets were measured on 2 AVX2 cores (about 110 tweets/s through the
        # 6-layer encoder): the four build in 5-8 minutes.
        Family("text_classification", "text-classification", ("sentiment",),
               Sample("text/plain", text="I love riding in self-driving cars!"), serving={**SERVING, **TWO_WORKERS},
               demos=(_text_demo("bert_sentiment", "sentiment", train_tweets=9000, epochs=8, eval_tweets=1500),
                      _text_demo("roberta_sentiment", "sentiment", train_tweets=7000, epochs=8, eval_tweets=1500))),
        Family("fill_mask", "fill-mask", (), Sample("text/plain", text="The capital of France is [MASK]."),
               demos=(_text_demo("bert_fill_mask", "fill_mask", train_tweets=3500, epochs=2, eval_tweets=1000, trained_layers=2),
                      _text_demo("roberta_fill_mask", "fill_mask", train_tweets=3000, epochs=2, eval_tweets=1000, trained_layers=1))),
    )
}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family '{name}'; known: {', '.join(FAMILIES)}") from None


def demos() -> dict[str, tuple[Family, Demo]]:
    """Every demo model of the registry by name, with its family, in the store's build order."""
    return {demo.name: (entry, demo) for entry in FAMILIES.values() for demo in entry.demos}


def text_families() -> list[Family]:
    """The families whose handler is a text one (imports every family's handler module)."""
    return [entry for entry in FAMILIES.values() if entry.is_text]


def for_task(task: str) -> Family:
    """The text family serving ``task`` ("sentiment", "text-classification", "fill-mask")."""
    matches = [f for f in text_families() if task in (f.task, *f.aliases)]
    if not matches:
        raise ValueError(f"unknown text task '{task}'; known: {', '.join(text_tasks())}")
    return matches[0]


def text_tasks() -> list[str]:
    return [name for f in text_families() for name in (*f.aliases, f.task)]


def of_archive(archive: Path) -> Family:
    """The family of a .mar, from its manifest's handler (never guessed from the model's name)."""
    with zipfile.ZipFile(archive) as mar:
        handler = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]["handler"]
    return family(Path(handler.split(":")[0]).stem)
