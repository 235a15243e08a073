"""The text demos' training pieces, on small inputs: tweet cleaning, the split, the clear-sentence
set, and the mean-pooling layer that lets a stock sequence classifier read a sentence embedding."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from graviton_serve.demos.corpus import LABELS, clean_tweet, clear_sentences, tweets
from graviton_serve.demos.sentiment import append_mean_pooling_layer

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 100}


def test_cleaning_leaves_the_words_a_user_would_write():
    assert clean_tweet("RT @united: Lost my bag AGAIN #fail http://t.co/x1Y2 @AmericanAir") == "Lost my bag AGAIN fail"
    assert clean_tweet("Keep it up :) @AmericanAir") == "Keep it up :)"
    assert clean_tweet("Jack White &amp; Run The Jewels, worth it http:_") == "Jack White & Run The Jewels, worth it"
    assert clean_tweet("so good \u00e2\u0080\u0099 here") == "so good here"


def test_split_is_fixed_disjoint_and_clean():
    train, held_out = tweets()
    assert len(held_out) > 3000 and len(train) > 9 * len(held_out) - 10
    assert not {t for t, _ in train} & {t for t, _ in held_out}
    assert (train[:3], held_out[:3]) == tuple(part[:3] for part in tweets())
    assert not any("http" in t or "&amp;" in t for t, _ in train)


def test_clear_sentences_are_at_least_60_and_cover_every_label():
    rows = clear_sentences()
    assert len(rows) >= 60 and len({t for t, _ in rows}) == len(rows)
    assert all(sum(label == i for _, label in rows) >= 20 for i in range(len(LABELS)))


def _first_token_outputs(model, ids, mask):
    with torch.inference_mode():
        return model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]


def test_mean_pooling_layer_gives_the_normalised_mean_of_the_real_tokens():
    for model in (BertForSequenceClassification(BertConfig(**TINY)).eval(),
                  RobertaForSequenceClassification(RobertaConfig(**TINY, pad_token_id=1)).eval()):
        ids = torch.tensor([[0, 5, 6, 7, 2, 1, 1], [0, 8, 9, 10, 11, 12, 2]])
        mask = (ids != 1).long() if isinstance(model, RobertaForSequenceClassification) else torch.tensor([[1] * 5 + [0] * 2, [1] * 7])
        with torch.inference_mode():
            below = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        append_mean_pooling_layer(model)
        assert model.config.num_hidden_layers == 3 and len(model.base_model.encoder.layer) == 3
        pooled = _first_token_outputs(model, ids, mask)
        for row in range(2):
            real = below[row][mask[row].bool()]
            expected = torch.nn.functional.layer_norm(real.mean(0) + real[0] / 100, (32,), eps=model.config.layer_norm_eps)
            torch.testing.assert_close(pooled[row], expected, atol=2e-4, rtol=1e-3)
        # padding never enters the mean: the same text unpadded gives the same vector
        alone = _first_token_outputs(model, ids[:1, :5], mask[:1, :5])
        torch.testing.assert_close(alone[0], pooled[0], atol=1e-5, rtol=1e-5)


def test_the_pooling_layer_survives_save_and_load(tmp_path):
    model = BertForSequenceClassification(BertConfig(**TINY, num_labels=3)).eval()
    append_mean_pooling_layer(model)
    model.save_pretrained(tmp_path)
    loaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, mask = torch.tensor([[0, 5, 6, 2]]), torch.ones(1, 4, dtype=torch.long)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits)
