"""Adding a model family touches two places: its handler module and one registry entry. This
test adds token classification that way and serves it through TorchServe's loader: the demo
store's packaging, the family lookup from an archive and ``scripts/serve``'s call lines all work
from the registry entry alone.

A family with a demo model touches three files: its handler module (``handlers/<name>.py``), its
recipe (``graviton_serve/demos/<name>.py``) and its registry entry, with its demo, in
``graviton_serve/families.py``. The second test adds the family that way (its handler and recipe
in ``tests/new_family/``, its entry added by the test) and builds the demo through
``build_demo_store``, which names no model: the store, the int8 check and serving work from the
entry alone."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

from graviton_serve import demo_store, families
from graviton_serve.archive import ArchiveSpec, build_archive, unpack_archive
from graviton_serve.demos.corpus import minilm_dir
from tests.conftest import TESTS
from tests.inprocess import load_service, predict, request

HANDLER = TESTS / "new_family" / "token_classification.py"
RECIPE = "tests.new_family.recipe"  # tests/new_family/recipe.py
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


@pytest.fixture
def token_family_with_demo(monkeypatch, tmp_path):
    """The one registry entry, with its demo (file 3 of 3; files 1 and 2 are the handler module
    and the recipe). The demo's weights are cached under tmp_path, not in the checkout's cache."""
    demo = families.Demo("ner", f"{RECIPE}:make", "model.safetensors", ("tests/new_family/recipe.py",),
                         evaluation=f"{RECIPE}:held_out_evaluation")
    entry = families.Family("token_classification", "token-classification", ("ner",),
                            families.Sample("text/plain", text="Ada Lovelace lived in London."),
                            demos=(demo,), handler_file=HANDLER)
    monkeypatch.setitem(families.FAMILIES, entry.name, entry)
    monkeypatch.setattr(demo_store, "CACHE_DIR", tmp_path / "cache")
    return entry


def test_a_family_with_a_demo_added_in_three_files_is_built_by_the_demo_store_and_served(token_family_with_demo, tmp_path):
    from handlers.precision_modes import int8_engine
    from handlers.cpu_features import CpuFeatures

    (archive,) = demo_store.build_demo_store(tmp_path / "store", names=["ner"])

    assert archive == tmp_path / "store" / "ner.mar" and families.of_archive(archive) is token_family_with_demo
    assert token_family_with_demo.is_text and token_family_with_demo.offers_int8  # read from its handler class
    assert list(families.demos())[-1] == "ner" and (tmp_path / "cache" / "weights" / "ner").is_dir()
    manifest = unpack_archive(archive, tmp_path / "unpacked")
    assert manifest["model"]["handler"] == "token_classification.py"
    metadata = json.loads((tmp_path / "unpacked" / "metadata.json").read_text())
    # The archive packs the recipe's files (a tokenizer's and a model's), the handler, its config and
    # metadata: nothing of the build's caches (the int8 check's among them).
    packed = {path.name for path in (tmp_path / "unpacked").iterdir() if path.is_file()}
    assert packed == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metadata.json",
                      "model-config.yaml", "token_classification.py"}
    if int8_engine(CpuFeatures.detect().is_arm) is not None:  # the int8 check ran, from the entry's evaluation
        assert metadata["int8"]["metric"] == "token accuracy" and metadata["int8"]["fp32"] == 1.0
    service = load_service(tmp_path / "unpacked", "token_classification.py", name="ner")
    sample = token_family_with_demo.sample
    good, blank = predict(service, [request(sample.body(), sample.content_type), request("  ", "text/plain")])
    assert good.status == 200 and [piece["token"] for piece in good.json()][:2] == ["ada", "love"]
    assert {piece["label"] for piece in good.json()} == {"O"}
    assert blank.status == 400 and blank.json()["type"] == "BadInput"
    # built once: a second build finds the archive up to date
    assert demo_store.build_demo_store(tmp_path / "store", names=["ner"]) == [archive]
