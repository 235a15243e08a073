"""Hugging Face text models, the part every text task shares: tokenizer, text extraction,
truncation and collate. Tasks: ``text_classification`` (sentiment) and ``fill_mask``.

Any BERT- or RoBERTa-family checkpoint loads through ``from_pretrained(model_dir)``: the archive
holds its config, weights and tokenizer files. Each request is tokenized once, alone, and
truncated at the model's maximum; a batch is padded to its longest item only (never to
max_length), and the forward covers the whole batch.

Inputs: a raw UTF-8 body, a JSON string, or JSON {"text": ...} / {"inputs": ...} (Hugging Face
and KServe clients); options in the JSON body or as form fields.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer

from handlers.model_handler import ModelHandler
from handlers.payload import Payload
from handlers.settings import Setting, positive_int

TEXT_KEYS = ("text", "inputs")


@dataclass(frozen=True)
class TextItem:
    input_ids: list[int]
    truncated: bool
    top_k: int = 0
    mask_positions: tuple[int, ...] = ()


class TextHandler(ModelHandler):
    settings = {"max_text_bytes": Setting(65_536, positive_int(10_000_000))}
    offers_int8 = True  # a transformer's compute is its Linear layers

    @property
    @abstractmethod
    def auto_model(self) -> Any:
        """The transformers Auto class of the task, e.g. AutoModelForSequenceClassification."""

    def load(self, model_dir: Path, serialized_file: str | None, settings: dict, device: torch.device) -> nn.Module:
        self.max_text_bytes = settings["max_text_bytes"]
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = self.auto_model.from_pretrained(model_dir)
        self.max_tokens = min(self.tokenizer.model_max_length, _position_limit(model.config))
        return model

    def decode(self, payload: Payload) -> TextItem:
        text = self.prepare(payload.text(TEXT_KEYS, self.max_text_bytes))
        ids = self.tokenizer(text, truncation=False, verbose=False)["input_ids"]
        truncated = len(ids) > self.max_tokens
        if truncated:  # keep the closing special token ([SEP] or </s>)
            ids = ids[: self.max_tokens - 1] + ids[-1:]
        return self.item(text, ids, truncated, payload)

    def prepare(self, text: str) -> str:
        """The text as the tokenizer should see it."""
        return text

    def item(self, text: str, ids: list[int], truncated: bool, payload: Payload) -> TextItem:
        """The decoded item; a task adds its own options and checks."""
        return TextItem(ids, truncated)

    def collate(self, items: list[TextItem]) -> dict:
        # Padded to the longest item of this batch only.
        return dict(self.tokenizer.pad({"input_ids": [item.input_ids for item in items]}, padding="longest", return_tensors="pt"))

    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(**batch).logits

    def check_inputs(self) -> list[Payload]:
        return [Payload(body=text, content_type="text/plain") for text in self.check_texts]

    check_texts: tuple[str, ...] = ()  # fixed sentences for the precision guard and compile warm-up


def _position_limit(config: Any) -> int:
    positions = getattr(config, "max_position_embeddings", 512)
    # RoBERTa numbers positions from padding_idx + 1, so two of its slots are not usable.
    return positions - 2 if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") else positions
