"""The benchmark's stock text reference, written in the manner of TorchServe's Hugging Face
example (examples/Huggingface_Transformers/Transformer_handler_generalized.py): TorchServe's
BaseHandler, every request padded to max_length, fp32, no tuning. Only scripts/bench serves it.
"""

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from ts.torch_handler.base_handler import BaseHandler

MAX_LENGTH = 128


class StockTextClassifier(BaseHandler):
    def initialize(self, context):
        model_dir = context.system_properties["model_dir"]
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        self.initialized = True

    def preprocess(self, requests):
        ids, masks = [], []
        for request in requests:
            text = request.get("data") or request.get("body")
            if isinstance(text, (bytes, bytearray)):
                text = text.decode("utf-8")
            # The example's encode_plus, which Transformers 5 removed, in its current spelling.
            encoded = self.tokenizer(text, max_length=MAX_LENGTH, padding="max_length", truncation=True,
                                     add_special_tokens=True, return_tensors="pt")
            ids.append(encoded["input_ids"])
            masks.append(encoded["attention_mask"])
        return torch.cat(ids), torch.cat(masks)

    def inference(self, inputs, *args, **kwargs):
        input_ids, attention_mask = inputs
        with torch.no_grad():
            logits = self.model(input_ids, attention_mask=attention_mask).logits
        return [self.model.config.id2label[int(index)] for index in logits.argmax(-1)]

    def postprocess(self, outputs):
        return outputs
