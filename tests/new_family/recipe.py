"""The demo recipe of the token-classification family tests/test_new_family.py adds (in
graviton_serve/demos/ for a real family): a tiny BERT over MiniLM's real WordPiece vocabulary
whose classifier is rigged to answer "O" (outside any entity), and the held-out metric the int8
check scores it with. Nothing is trained: the test counts files, not accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer, BertConfig, BertForTokenClassification

from graviton_serve.demos import SEED, Evaluation
from graviton_serve.demos.corpus import minilm_dir

LABELS = ("O", "PER", "LOC")
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
HELD_OUT = ["Grace Hopper worked in Arlington.", "Alan Turing was born in London."]  # every word piece is "O"


def make(demo, folder: Path) -> dict:
    """Writes the model (``demo``'s serialized file among its files) and tokenizer into ``folder``."""
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = BertForTokenClassification(BertConfig(vocab_size=len(tokenizer), num_labels=len(LABELS),
                                                  id2label=dict(enumerate(LABELS)),
                                                  label2id={label: i for i, label in enumerate(LABELS)}, **TINY))
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([4.0, 0.0, 0.0]))  # "O" wins over the random weights' logits
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert (folder / demo.serialized_file_name).exists()
    return {"trained": False, "description": "tiny BERT token classifier rigged to answer O"}


def token_accuracy(model: torch.nn.Module, tokenizer, texts: list[str]) -> float:
    """The share of the real tokens of ``texts`` labelled "O" (all of them are): 0..1."""
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        predicted = model(**encoded).logits.argmax(-1)
    real = encoded["attention_mask"].bool()
    return float((predicted[real] == LABELS.index("O")).float().mean())


def held_out_evaluation(demo, folder: Path) -> Evaluation:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForTokenClassification.from_pretrained(folder)
    return Evaluation(model, "token accuracy", len(HELD_OUT), lambda m: token_accuracy(m, tokenizer, HELD_OUT))
