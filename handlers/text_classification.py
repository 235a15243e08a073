"""Text classification (sentiment): one text in, ``{"label", "score", "scores"}`` out.

``scores`` maps every label of the model's ``id2label`` to its probability; ``label``/``score``
are the best of them; ``"truncated": true`` is added when the text was cut at the model's maximum
number of tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForSequenceClassification

from handlers.torchserve_wire import TorchServeHandler
from handlers.text import TextHandler, TextItem


class TextClassification(TextHandler):
    auto_model = AutoModelForSequenceClassification
    check_texts = ("I love this, it is wonderful!", "This is the worst thing that ever happened.",
                   "The car drove itself to the store.", "Not sure how I feel about autonomous vehicles.",
                   "Terrible service, never again.", "What a great day for a drive!")

    def load(self, model_dir, serialized_file, settings, device):
        model = super().load(model_dir, serialized_file, settings, device)
        self.labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        return model

    def postprocess(self, logits: torch.Tensor, batch: dict) -> list[torch.Tensor]:
        return list(torch.softmax(logits.float(), dim=-1).unbind(0))

    def encode(self, probabilities: torch.Tensor, item: TextItem) -> Any:
        scores = {label: round(float(p), 6) for label, p in zip(self.labels, probabilities.tolist())}
        best = max(scores, key=scores.get)
        result: dict = {"label": best, "score": scores[best], "scores": scores}
        if item.truncated:
            result["truncated"] = True
        return result


handle = TorchServeHandler(TextClassification)
