"""Streamed text: token by token, the deltas join to exactly what decoding all ids gives (also for
multi-byte characters split across tokens and for random ids), and a stop string is never shown,
not even in part."""

import random

import pytest
from transformers import AutoTokenizer

from models.decoding.text import IncrementalText
from tests.conftest import STORYTELLER


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(STORYTELLER)


def stream(tok, ids, stop=()):
    it = IncrementalText(tok, stop)
    deltas = [it.add(i) for i in ids]
    return deltas, "".join(deltas) + it.flush(), it


@pytest.mark.parametrize("text", ["Once upon a time, there was a little cat named Leo.",
                                  "caf\u00e9, \u00f1 and \U0001f600 split over byte tokens", "spaces   and\n\nlines"])
def test_deltas_join_to_the_full_decode(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    _, out, _ = stream(tok, ids)
    assert out == tok.decode(ids, skip_special_tokens=True) == text


def test_random_ids_decode_the_same_incrementally(tok):
    rng = random.Random(0)
    for _ in range(100):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 30))]
        _, out, _ = stream(tok, ids)
        assert out.replace("\ufffd", "") == tok.decode(ids, skip_special_tokens=True).replace("\ufffd", "")


def test_a_stop_string_is_cut_and_never_shown_in_part(tok):
    ids = tok("The dog ran to the park and the cat slept.", add_special_tokens=False)["input_ids"]
    deltas, out, it = stream(tok, ids, stop=("the cat",))
    assert it.stopped and out == "The dog ran to the park and "
    shown = ""
    for d in deltas:
        shown += d
        assert "the c" not in shown.removeprefix("The dog ran to the park and ")
