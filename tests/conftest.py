"""Shared fixtures: tiny deterministic models written once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOPIC_LABELS = ("world", "sports", "business", "science")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of a tiny BERT embedder and a tiny 4-label classifier (seeded)."""
    from models.tiny import build_tiny_bert

    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "embed": build_tiny_bert(root / "tiny-embed", task="embed", seed=1),
        "classify": build_tiny_bert(root / "tiny-cls", task="classify", labels=TOPIC_LABELS, seed=2),
    }
