"""The default generative base's parts: the seeded corpus, the tokenizer trained on it (with
its chat template), and the builder's output loading as a Hugging Face causal LM."""

import json

import pytest

from models.generative.build import SERVED_CHAT_TEMPLATE, SPECIAL, build, corpus_texts, train_tokenizer
from models.generative.corpus import dialogues, stories


def test_the_corpus_is_the_same_for_the_same_seed_and_reads_as_sentences():
    assert stories(50, seed=3) == stories(50, seed=3) and stories(50, seed=3) != stories(50, seed=4)
    assert dialogues(20) == dialogues(20)
    text = " ".join(stories(500))
    assert " a owl" not in text and " a eagle" not in text  # articles agree
    for d in dialogues(200):
        assert [m["role"] for m in d] == ["user", "assistant"] and all(m["content"].strip() for m in d)
        if d[0]["content"].startswith("Write a short story about"):
            name = d[0]["content"].rstrip(".").split()[-1]
            assert name in d[1]["content"]  # the story is about the one asked for


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(corpus_texts(2000, 800), 2048)


def test_the_tokenizer_round_trips_and_renders_the_chat_template(tokenizer):
    for text in stories(20, seed=9) + ["Zebras? Unseen words, digits 123 and caf\u00e9 still round-trip."]:
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert all(tokenizer.convert_tokens_to_ids(t) != tokenizer.unk_token_id for t in SPECIAL if t != "<unk>")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi."}], tokenize=False,
                                           add_generation_prompt=True)
    # served prompts start with <s>, as every training text did (the training text itself is
    # rendered with CHAT_TEMPLATE and gets its <s> from `blocks`)
    assert prompt == "<s><|user|>\nHi.</s>\n<|assistant|>\n" and tokenizer.chat_template == SERVED_CHAT_TEMPLATE
    assert tokenizer("Hi.")["input_ids"][0] == tokenizer.bos_token_id


def test_the_build_loads_as_a_causal_lm_and_generates(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    card = build(tmp_path / "base", steps=2, batch=4, texts=corpus_texts(300, 100), say=lambda m: None)
    assert json.loads((tmp_path / "base" / "build_card.json").read_text()) == card
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "base")
    assert model.config.model_type == "llama" and 3e6 < card["parameters"] < 20e6
    ids = tok("Once upon a time", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
