"""The shipped generative base (models/data/storyteller, built by models/generative/build.py):
it loads as a Hugging Face causal LM with its chat template, predicts held-out text far better
than the unigram baseline, and writes sentences made of the corpus's words."""

import json
import math
import re
from pathlib import Path

import pytest

from models.generative.build import SAMPLE_PROMPTS, blocks, corpus_texts, generate_text
from models.generative.corpus import stories

BASE = Path(__file__).resolve().parents[2] / "models" / "data" / "storyteller"


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(BASE).eval(), AutoTokenizer.from_pretrained(BASE)


def test_held_out_text_is_predicted_far_better_than_by_word_frequencies(shipped):
    import torch

    model, tokenizer = shipped
    held = blocks(tokenizer, corpus_texts())[-64:]  # the rows the build held out
    with torch.no_grad():
        perplexity = math.exp(float(model(input_ids=held, labels=held).loss))
    card = json.loads((BASE / "build_card.json").read_text())
    assert abs(perplexity - card["held_out_perplexity"]) < 0.05 * card["held_out_perplexity"]
    assert perplexity < card["unigram_perplexity"] / 10, (perplexity, card["unigram_perplexity"])
    assert (BASE / "model.safetensors").stat().st_size < 25e6


def test_greedy_text_is_made_of_the_corpus_words(shipped):
    model, tokenizer = shipped
    vocabulary = set(re.findall(r"[A-Za-z]+", " ".join(stories(3000))))
    for prompt in SAMPLE_PROMPTS:
        words = re.findall(r"[A-Za-z]+", generate_text(model, tokenizer, prompt, max_new_tokens=40))
        assert len(words) >= 10, words
        assert sum(w in vocabulary for w in words) / len(words) > 0.95, words
