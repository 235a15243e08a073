"""Hugging Face text models: sequence classification (sentiment) and masked-LM (fill-mask).

Any BERT- or RoBERTa-family checkpoint loads through ``from_pretrained(model_dir)``: the archive
holds its config, weights and tokenizer files. Each request is tokenized once, alone, and
truncated at the model's maximum; a batch is padded to its longest item only (never to
max_length), and the forward covers the whole batch.

Inputs: a raw UTF-8 body, or JSON {"text": ...} / {"inputs": ...} (Hugging Face and KServe
clients); options (top_k) in the JSON body or as form fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

from handlers.core import ModelHandler, Setting, entry_point
from handlers.errors import BadInput, PayloadTooLarge
from handlers.payload import Payload, one_of, positive_int

TASKS = ("sentiment", "fill-mask")
MASK_SPELLINGS = ("[MASK]", "<mask>")  # BERT's and RoBERTa's; either works with either family
TEXT_KEYS = ("text", "inputs")


@dataclass(frozen=True)
class TextItem:
    input_ids: list[int]
    truncated: bool
    top_k: int
    mask_positions: tuple[int, ...] = ()


class TextHandler(ModelHandler):
    settings = {
        "task": Setting("sentiment", one_of(*TASKS)),
        "max_text_bytes": Setting(65_536, positive_int(10_000_000)),
        "top_k": Setting(5, positive_int(100)),
        "max_masks": Setting(5, positive_int(50)),
    }

    def load(self, model_dir: Path, serialized_file: str | None, settings: dict) -> nn.Module:
        self.task = settings["task"]
        self.max_text_bytes = settings["max_text_bytes"]
        self.default_top_k = settings["top_k"]
        self.max_masks = settings["max_masks"]
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model_class = AutoModelForMaskedLM if self.task == "fill-mask" else AutoModelForSequenceClassification
        model = model_class.from_pretrained(model_dir)
        self.max_tokens = min(self.tokenizer.model_max_length, _position_limit(model.config))
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        if self.task == "fill-mask" and self.tokenizer.mask_token_id is None:
            raise ValueError("model-config.yaml: 'handler.task' is fill-mask but the tokenizer has no mask token")
        self.unwanted_in_sequence = set(self.tokenizer.all_special_ids) - {self.tokenizer.mask_token_id}
        return model

    # -- one request ---------------------------------------------------------------------------

    def decode(self, payload: Payload) -> TextItem:
        text = self._text(payload)
        top_k = payload.option("top_k", positive_int(100), self.default_top_k)
        if self.task == "fill-mask":
            for spelling in MASK_SPELLINGS:
                text = text.replace(spelling, self.tokenizer.mask_token)
        ids = self.tokenizer(text, truncation=False, verbose=False)["input_ids"]
        truncated = len(ids) > self.max_tokens
        if truncated:  # keep the closing special token ([SEP] or </s>)
            ids = ids[: self.max_tokens - 1] + ids[-1:]
        if self.task != "fill-mask":
            return TextItem(ids, truncated, top_k)
        masks = tuple(i for i, token in enumerate(ids) if token == self.tokenizer.mask_token_id)
        all_masks = text.count(self.tokenizer.mask_token)
        if all_masks == 0:
            raise BadInput(f"the text has no mask; write {self.tokenizer.mask_token} (or [MASK] / <mask>) where a word is missing")
        if all_masks > self.max_masks:
            raise BadInput(f"the text has {all_masks} masks; this model fills at most {self.max_masks} per text")
        if len(masks) < all_masks:
            raise BadInput(f"a mask lies beyond the model's {self.max_tokens} tokens; shorten the text before it")
        return TextItem(ids, truncated, top_k, masks)

    def _text(self, payload: Payload) -> str:
        document = payload.json_body()
        if isinstance(document, dict):
            key = next((k for k in TEXT_KEYS if k in document), None)
            if key is None:
                raise BadInput('the JSON body has no "text" field; send {"text": "..."} or the raw text')
            text = document[key]
            if not isinstance(text, str):
                raise BadInput(f'"{key}" must be a string (one text per request)')
        elif isinstance(payload.body, str):
            text = payload.body
        elif isinstance(payload.body, (bytes, bytearray)):
            if len(payload.body) > self.max_text_bytes:
                raise PayloadTooLarge(f"the text is over this model's limit of {self.max_text_bytes} bytes; send less")
            try:
                text = bytes(payload.body).decode("utf-8")
            except UnicodeDecodeError as error:
                raise BadInput(f"the body is not valid UTF-8 (byte {error.start}); send UTF-8 text") from None
        else:
            raise BadInput('send the text as the body, or as JSON {"text": "..."}')
        if len(text.encode("utf-8")) > self.max_text_bytes:
            raise PayloadTooLarge(f"the text is over this model's limit of {self.max_text_bytes} bytes; send less")
        if not text.strip():
            raise BadInput("the text is empty; send some text")
        return text

    def check_payloads(self) -> list[Payload]:
        """Fixed sentences for the precision guard and compile warm-up."""
        if self.task == "fill-mask":
            texts = ["The capital of France is [MASK].", "I [MASK] riding in self-driving cars.",
                     "She went to the [MASK] to buy some bread.", "The [MASK] was late again this morning.",
                     "We need more [MASK] on the roads.", "This is the [MASK] day of my life!"]
        else:
            texts = ["I love this, it is wonderful!", "This is the worst thing that ever happened.",
                     "The car drove itself to the store.", "Not sure how I feel about autonomous vehicles.",
                     "Terrible service, never again.", "What a great day for a drive!"]
        return [Payload(body=text, content_type="text/plain") for text in texts]

    # -- the batch ------------------------------------------------------------------------------

    def collate(self, items: list[TextItem]) -> dict:
        # Padded to the longest item of this batch only.
        return dict(self.tokenizer.pad({"input_ids": [item.input_ids for item in items]}, padding="longest", return_tensors="pt"))

    def forward(self, model: nn.Module, batch: dict) -> list[torch.Tensor]:
        logits = model(**batch).logits
        if self.task != "fill-mask":
            return list(torch.softmax(logits.float(), dim=-1).cpu().unbind(0))
        # Only the masked positions leave the forward: [masks, vocab] per item.
        is_mask = batch["input_ids"] == self.tokenizer.mask_token_id
        return [torch.softmax(row[where].float(), dim=-1).cpu() for row, where in zip(logits, is_mask)]

    def split(self, outputs: list, count: int) -> list:
        return outputs

    def encode(self, probabilities: torch.Tensor, item: TextItem) -> Any:
        if self.task != "fill-mask":
            scores = {label: round(float(p), 6) for label, p in zip(self.labels, probabilities.tolist())}
            best = max(scores, key=scores.get)
            result: dict = {"label": best, "score": scores[best], "scores": scores}
            if item.truncated:
                result["truncated"] = True
            return result
        per_mask = [self._fill(item, position, row) for position, row in zip(item.mask_positions, probabilities)]
        return per_mask[0] if len(per_mask) == 1 else per_mask

    def _fill(self, item: TextItem, position: int, probabilities: torch.Tensor) -> list[dict]:
        top = torch.topk(probabilities, min(item.top_k, probabilities.numel()))
        answers = []
        for score, token in zip(top.values.tolist(), top.indices.tolist()):
            ids = list(item.input_ids)
            ids[position] = token
            kept = [i for i in ids if i not in self.unwanted_in_sequence]
            answers.append({
                "token": token,
                "token_str": self.tokenizer.decode([token]).strip(),
                "score": round(score, 6),
                "sequence": self.tokenizer.decode(kept, clean_up_tokenization_spaces=True).strip(),
            })
        return answers


def _position_limit(config: Any) -> int:
    positions = getattr(config, "max_position_embeddings", 512)
    # RoBERTa numbers positions from padding_idx + 1, so two of its slots are not usable.
    return positions - 2 if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert") else positions


handle = entry_point(TextHandler)
