"""A model family added the documented way (docs/architecture.md), to count what adding one
takes: this module (in handlers/ for a real family) and one entry in graviton_serve/families.py.

Token classification (e.g. named entities): one text in, one ``{"token", "label", "score"}`` per
word piece out. Used by tests/test_new_family.py.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForTokenClassification

from handlers.torchserve_wire import TorchServeHandler
from handlers.text import TextHandler, TextItem


class TokenClassification(TextHandler):
    auto_model = AutoModelForTokenClassification

    def load(self, model_dir, serialized_file, settings, device):
        model = super().load(model_dir, serialized_file, settings, device)
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        return model

    def postprocess(self, logits: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        return [torch.softmax(row[mask.bool()].float(), dim=-1) for row, mask in zip(logits, batch["attention_mask"])]

    def encode(self, probabilities: torch.Tensor, item: TextItem) -> list[dict]:
        tokens = self.tokenizer.convert_ids_to_tokens(item.input_ids)
        best = probabilities.max(dim=-1)
        return [{"token": token, "label": self.labels[int(index)], "score": round(float(score), 6)}
                for token, score, index in zip(tokens, best.values, best.indices)
                if token not in self.tokenizer.all_special_tokens]


handle = TorchServeHandler(TokenClassification)
