"""What scripts/bench loads: each workload's bodies, our archive, and its stock reference archive.

Stock archives are built from our archives' own weights (so both paths run the same network),
cached under .cache/bench and rebuilt when our archive is newer.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

import yaml

from graviton_serve.archive import ArchiveSpec, build_archive, handler_sources, run_archiver, source_digest, unpack_archive
from graviton_serve.bench.results import Workload
from graviton_serve.families import family
from graviton_serve.paths import CACHE_DIR, MODEL_STORE
from graviton_serve.progress import say
from graviton_serve.sample_data import photo

BENCH_DIR = CACHE_DIR / "bench"
STOCK_DIR = BENCH_DIR / "stock"
STOCK_TEXT_HANDLER = Path(__file__).parent / "stock_reference" / "text_classifier.py"
BERT_BASE = "bert_base_seq128"  # a BERT-base-size classifier, random weights, inputs of 128 tokens
SEQ_LENGTH = 128
WORKLOADS = ("bert_sentiment", BERT_BASE, "resnet50", "densenet161", "efficientnet_lite0", "mnist")
UNTRAINED_BERT_BASE_NOTE = "UNTRAINED: random BERT-base weights, for measuring speed only."


def _stock_archive(name: str, ours: Path, what: str, pack: Callable[[Path, dict, Path], Path]) -> Path:
    """``<name>_stock.mar``, rebuilt only when our archive is newer: ``pack(unpacked folder of ours,
    its manifest, a scratch folder)`` builds it from our archive's own files."""
    target = STOCK_DIR / f"{name}_stock.mar"
    if target.exists() and target.stat().st_mtime >= ours.stat().st_mtime:
        return target
    say(f"bench: packaging {target.name} ({what})")
    with tempfile.TemporaryDirectory() as work:
        ours_dir, scratch = Path(work) / "ours", Path(work) / "scratch"
        scratch.mkdir()
        return pack(ours_dir, unpack_archive(ours, ours_dir), scratch)


def _categories(name: str, handler_settings: dict) -> list[str]:
    """A vision archive's category names, as its handler reads them (torchvision's weights entry, or timm's table)."""
    if "weights" in handler_settings:
        from handlers.vision import weights_entry

        return list(weights_entry(name, handler_settings["weights"]).meta["categories"])
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_descriptions())


def stock_vision_archive(name: str, ours: Path) -> Path:
    """TorchServe's own ``image_classifier`` handler over our archive's state dict."""
    from graviton_serve.bench.stock_reference.vision_models import MODEL_FILES

    def pack(ours_dir: Path, manifest: dict, scratch: Path) -> Path:
        categories = _categories(name, yaml.safe_load((ours_dir / "model-config.yaml").read_text())["handler"])
        index_to_name = scratch / "index_to_name.json"
        index_to_name.write_text(json.dumps({str(i): c for i, c in enumerate(categories)}))
        model_file = scratch / "model.py"
        model_file.write_text(MODEL_FILES[name])
        return run_archiver(f"{name}_stock", ours_dir / manifest["model"]["serializedFile"], "image_classifier",
                            STOCK_DIR, extras=index_to_name, model_file=model_file)

    return _stock_archive(name, ours, "TorchServe's image_classifier handler", pack)


def stock_text_archive(name: str, ours: Path) -> Path:
    """A handler in the manner of TorchServe's Hugging Face example over our archive's model files."""

    def pack(ours_dir: Path, manifest: dict, scratch: Path) -> Path:
        model_files = [path for path in sorted(ours_dir.iterdir())
                       if path.is_file() and path.suffix in (".json", ".txt", ".model") and path.name != "metadata.json"]
        return run_archiver(f"{name}_stock", ours_dir / manifest["model"]["serializedFile"], STOCK_TEXT_HANDLER,
                            STOCK_DIR, extras=",".join(map(str, model_files)))

    return _stock_archive(name, ours, f"Hugging Face example-style handler, padded to {SEQ_LENGTH}", pack)


def bert_base_archive() -> Path:
    """Our archive of a BERT-base-size classifier (12 layers, hidden 768) with random weights and
    the real uncased WordPiece vocabulary: the size users serve, without a download. It asks for
    ``precision: int8``: random weights have no held-out data to prove int8 on, so auto would not
    choose it; the check-input guard still runs. Rebuilt when the handler code changes."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from graviton_serve.demos.corpus import minilm_dir

    target = BENCH_DIR / f"{BERT_BASE}.mar"
    model_config = family("text_classification").model_config(precision="int8")
    stamp_file, stamp = BENCH_DIR / f"{BERT_BASE}.stamp", json.dumps([source_digest(handler_sources()), model_config])
    if target.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return target
    say(f"bench: making {target.name} (random BERT-base weights; once, cached)")
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
        torch.manual_seed(0)
        config = BertConfig(vocab_size=tokenizer.vocab_size, num_labels=2, id2label={0: "negative", 1: "positive"},
                            label2id={"negative": 0, "positive": 1})
        BertForSequenceClassification(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        weights = folder / "model.safetensors"
        extras = [path for path in sorted(folder.iterdir()) if path != weights]
        metadata = {"model": BERT_BASE, "trained": False, "note": UNTRAINED_BERT_BASE_NOTE, "task": "sentiment"}
        built = build_archive(ArchiveSpec(BERT_BASE, "text_classification", weights, model_config, metadata, extras), BENCH_DIR)
    stamp_file.write_text(stamp)
    return built


def tweet_bodies() -> list[bytes]:
    """Held-out tweets the demo never trained on: real short texts."""
    from graviton_serve.demos.corpus import tweets

    return [text.encode("utf-8") for text, _ in tweets()[1][:200]]


def seq128_bodies(count: int = 64) -> list[bytes]:
    """Texts of exactly 128 tokens with the uncased WordPiece tokenizer (tweets run together), so
    our handler (which pads a batch to its longest item) and the stock one (which pads every
    request to 128) run the same sequence length."""
    from transformers import AutoTokenizer

    from graviton_serve.demos.corpus import minilm_dir, tweets

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    stream = [token for text, _ in tweets()[0] for token in tokenizer(text, add_special_tokens=False)["input_ids"]]
    bodies = []
    start = 0
    while len(bodies) < count and start + SEQ_LENGTH < len(stream):
        text = tokenizer.decode(stream[start:start + SEQ_LENGTH - 2])
        if len(tokenizer(text)["input_ids"]) == SEQ_LENGTH:
            bodies.append(text.encode("utf-8"))
        start += SEQ_LENGTH
    return bodies


def image_bodies(name: str) -> list[bytes]:
    if name == "mnist":
        return [family("mnist").sample.body()]
    return [photo(which).read_bytes() for which in ("flower", "china")]


def workloads(names: list[str]) -> list[Workload]:
    from graviton_serve.demo_store import build_demo_store

    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        raise ValueError(f"unknown workload '{unknown[0]}'; known: {', '.join(WORKLOADS)}")
    demo = [name for name in names if name != BERT_BASE]
    archives = {archive.stem: archive for archive in build_demo_store(MODEL_STORE, demo)} if demo else {}
    chosen = []
    for name in names:
        if name == BERT_BASE:
            ours = bert_base_archive()
            chosen.append(Workload(name, ours, seq128_bodies(), stock_text_archive(name, ours)))
        elif name == "bert_sentiment":
            chosen.append(Workload(name, archives[name], tweet_bodies(), stock_text_archive(name, archives[name])))
        elif name in ("resnet50", "densenet161", "efficientnet_lite0"):
            chosen.append(Workload(name, archives[name], image_bodies(name), stock_vision_archive(name, archives[name])))
        else:
            chosen.append(Workload(name, archives[name], image_bodies(name)))
    return chosen
