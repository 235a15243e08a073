"""Fill-mask: a text with one or more masks in, the top-k fillers of each mask out.

One mask: a list of ``{"token", "token_str", "score", "sequence"}``, best first (Hugging Face's
fill-mask pipeline shape); several masks: one such list per mask, in text order. Either
spelling, ``[MASK]`` (BERT) or ``<mask>`` (RoBERTa), works with either family.
"""

from __future__ import annotations

import re

import torch
from transformers import AutoModelForMaskedLM

from handlers.errors import BadInput
from handlers.torchserve_wire import TorchServeHandler
from handlers.payload import Payload
from handlers.settings import Setting, positive_int
from handlers.text import TextHandler, TextItem

MASK_SPELLINGS = ("[MASK]", "<mask>")
MAX_TOP_K = 100


class FillMask(TextHandler):
    auto_model = AutoModelForMaskedLM
    settings = {
        **TextHandler.settings,
        "top_k": Setting(5, positive_int(MAX_TOP_K)),
        "max_masks": Setting(5, positive_int(50)),
    }
    check_texts = ("The capital of France is [MASK].", "I [MASK] riding in self-driving cars.",
                   "She went to the [MASK] to buy some bread.", "The [MASK] was late again this morning.",
                   "We need more [MASK] on the roads.", "This is the [MASK] day of my life!")

    def load(self, model_dir, serialized_file, settings, device):
        model = super().load(model_dir, serialized_file, settings, device)
        if self.tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token: this model cannot serve fill-mask")
        self.default_top_k = settings["top_k"]
        self.max_masks = settings["max_masks"]
        self.mask_id, self.mask_token = self.tokenizer.mask_token_id, self.tokenizer.mask_token
        self.not_in_sequence = set(self.tokenizer.all_special_ids) - {self.mask_id}
        return model

    def prepare(self, text: str) -> str:
        for spelling in MASK_SPELLINGS:
            text = text.replace(spelling, self.mask_token)
        return text

    def item(self, text: str, ids: list[int], truncated: bool, payload: Payload) -> TextItem:
        top_k = payload.option("top_k", positive_int(MAX_TOP_K), self.default_top_k)
        masks = tuple(i for i, token in enumerate(ids) if token == self.mask_id)
        written = text.count(self.mask_token)
        if written == 0:
            raise BadInput("the text has no mask; write [MASK] or <mask> where a word is missing")
        if written > self.max_masks:
            raise BadInput(f"the text has {written} masks; this model fills at most {self.max_masks} per text")
        if len(masks) < written:
            raise BadInput(f"a mask lies beyond the model's {self.max_tokens} tokens; shorten the text before it")
        return TextItem(ids, truncated, top_k, masks)

    def postprocess(self, logits: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        # Only the masked positions leave the forward: [masks, vocab] per item.
        is_mask = batch["input_ids"] == self.mask_id
        return [torch.softmax(row[where].float(), dim=-1) for row, where in zip(logits, is_mask)]

    def encode(self, probabilities: torch.Tensor, item: TextItem) -> list:
        per_mask = [self._fill(item, position, row) for position, row in zip(item.mask_positions, probabilities)]
        return per_mask[0] if len(per_mask) == 1 else per_mask

    def _fill(self, item: TextItem, position: int, probabilities: torch.Tensor) -> list[dict]:
        top = torch.topk(probabilities, min(item.top_k, probabilities.numel()))
        answers = []
        for score, token in zip(top.values.tolist(), top.indices.tolist()):
            ids = list(item.input_ids)
            ids[position] = token
            answers.append({"token": token, "token_str": self.tokenizer.decode([token]).strip(),
                            "score": round(score, 6), "sequence": self._sequence(ids)})
        return answers

    def _sequence(self, ids: list[int]) -> str:
        """The text with one mask filled; other masks stay written as the mask token. RoBERTa's
        <mask> swallows the space before it (lstrip), so decoding would glue it to the word before:
        the space is put back."""
        text = self.tokenizer.decode([i for i in ids if i not in self.not_in_sequence], clean_up_tokenization_spaces=True)
        return re.sub(rf"(?<=\S){re.escape(self.mask_token)}", f" {self.mask_token}", text).strip()


handle = TorchServeHandler(FillMask)
