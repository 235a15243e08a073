"""int8's second guard, measured when a demo archive is built: the held-out accuracy of the
model through its int8 form (``handlers.acceleration.int8_model``, the serving code) beside
fp32, on the same held-out data its training was scored on. Stored in the archive's
metadata.json under ``int8`` and returned by describe; a worker refuses int8 if more than
``INT8_MAX_POINTS_LOST`` points were lost (``handlers.acceleration.int8_held_out``).

Measured with this machine's quantized engine: another CPU's engine (onednn on aarch64) rounds
differently, which the worker's own check-input guard covers at start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from graviton_serve.archive import source_digest
from graviton_serve.paths import ROOT
from graviton_serve.progress import say
from handlers import acceleration
from handlers.cpu_features import CpuFeatures

SOURCES = ("graviton_serve/int8_check.py", "handlers/acceleration.py")  # a change means measuring again
SENTIMENT = ("bert_sentiment", "roberta_sentiment")
FILL_MASK = ("bert_fill_mask", "roberta_fill_mask")


def held_out_int8(name: str, folder: Path) -> dict:
    """``{"int8": {...}}`` for a demo model whose files are in ``folder`` (cached there), or {}
    where int8 is not offered (the vision demos)."""
    if name not in (*SENTIMENT, *FILL_MASK, "mnist"):
        return {}
    cache = folder / f"int8-{source_digest([ROOT / path for path in SOURCES])}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    engine = acceleration.int8_engine(CpuFeatures.detect().is_arm)
    if engine is None:
        return {}
    say(f"{name}: measuring held-out accuracy through int8 ({engine} engine) beside fp32 (once; cached)")
    model, metric, examples, score = _evaluation(name, folder)
    model.eval()
    with torch.inference_mode():
        fp32 = score(model)
        int8 = score(acceleration.int8_model(model, engine))
    measured = {"int8": {"metric": metric, "fp32": round(fp32, 4), "int8": round(int8, 4), "examples": examples,
                         "engine": engine}}
    say(f"{name}: held-out {metric}: fp32 {fp32:.4f}, int8 {int8:.4f} on {examples} examples")
    cache.write_text(json.dumps(measured))
    return measured


def _evaluation(name: str, folder: Path) -> tuple[torch.nn.Module, str, int, Callable[[torch.nn.Module], float]]:
    """(the fp32 model, the metric's name, the number of examples, score(model) -> the metric)."""
    if name == "mnist":
        from graviton_serve import demo_mnist
        from handlers.mnist import MnistNet

        split = demo_mnist.split_digits()
        images = demo_mnist._prepare(split.held_out_images)
        model = MnistNet()
        model.load_state_dict(torch.load(folder / "mnist.pt", weights_only=True))
        return model, "accuracy", len(split.held_out_labels), lambda m: demo_mnist.accuracy(m, images, split.held_out_labels)

    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    from graviton_serve import demo_text

    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = demo_text.tweets()[1][: demo_text.BUDGETS[name].eval_tweets]  # the held-out tweets training was scored on
    if name in SENTIMENT:
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        texts, labels = [text for text, _ in rows], torch.tensor([label for _, label in rows])

        def accuracy(m: torch.nn.Module) -> float:
            predicted = []
            for start in range(0, len(texts), 64):
                encoded = tokenizer(texts[start:start + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
                predicted.append(m(**encoded).logits.argmax(-1))
            return float((torch.cat(predicted) == labels).float().mean())

        return model, "accuracy", len(texts), accuracy
    model = AutoModelForMaskedLM.from_pretrained(folder)
    texts = [text for text, _ in rows]

    def top1(m: torch.nn.Module) -> float:
        head = m.cls if hasattr(m, "cls") else m.lm_head  # BERT's / RoBERTa's masked-LM head
        return demo_text.fill_mask_accuracy(
            lambda ids, mask, where: head(m.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[where]),
            tokenizer, texts)[0]

    return model, "masked-token top-1 accuracy", len(texts), top1
