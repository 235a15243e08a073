"""Adding a model family touches two places: its handler module and one registry entry. This
test adds token classification that way and serves it through TorchServe's loader: the demo
store's packaging, the family lookup from an archive and ``scripts/serve``'s call lines all work
from the registry entry alone."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

from graviton_serve import families
from graviton_serve.archive import ArchiveSpec, build_archive, unpack_archive
from graviton_serve.demo_text import minilm_dir
from tests.conftest import TESTS
from tests.inprocess import load_service, predict, request

HANDLER = TESTS / "new_family" / "token_classification.py"
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)


@pytest.fixture
def token_family(monkeypatch):
    """The one registry entry (place 2 of 2; place 1 is the handler module)."""
    entry = families.Family("token_classification", "token-classification", ("ner",),
                            families.Sample("text/plain", text="Ada Lovelace lived in London."))
    monkeypatch.setitem(families.FAMILIES, entry.name, entry)
    return entry


def test_a_family_added_in_two_places_is_packaged_found_and_served(token_family, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    labels = {0: "O", 1: "PER", 2: "LOC"}
    model = BertForTokenClassification(BertConfig(vocab_size=len(tokenizer), num_labels=3, id2label=labels,
                                                  label2id={v: k for k, v in labels.items()}, **TINY))
    source = tmp_path / "checkpoint"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    weights = source / "model.safetensors"
    spec = ArchiveSpec("ner", token_family.name, weights, token_family.model_config(), {"model": "ner", "trained": False},
                       [path for path in sorted(source.iterdir()) if path != weights], handler_file=HANDLER)
    archive = build_archive(spec, tmp_path / "store")

    assert families.of_archive(archive) is token_family
    unpack_archive(archive, tmp_path / "unpacked")
    service = load_service(tmp_path / "unpacked", "token_classification.py", name="ner")
    good, blank = predict(service, [request(token_family.sample.body(), token_family.sample.content_type),
                                    request("  ", "text/plain")])
    assert good.status == 200 and [piece["token"] for piece in good.json()][:2] == ["ada", "love"]
    assert all(piece["label"] in labels.values() for piece in good.json())
    assert blank.status == 400 and blank.json()["type"] == "BadInput"
