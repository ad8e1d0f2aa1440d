import pytest

from models.errors import InvalidRequest, VariantNotFound
from models.target import Target


@pytest.mark.parametrize(
    "text, head, adapter, variant",
    [
        ("minilm", "minilm", None, None),
        ("sentiment", "sentiment", None, None),
        ("minilm:sentiment", "minilm", "sentiment", None),
        ("minilm@onnx-int8", "minilm", None, "onnx-int8"),
        ("minilm:sentiment@onnx", "minilm", "sentiment", "onnx"),
        ("sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", None, None),
    ],
)
def test_parse_and_format_round_trip(text, head, adapter, variant):
    t = Target.parse(text)
    assert (t.head, t.adapter, t.variant) == (head, adapter, variant)
    assert t.format() == text
    assert Target.parse(t.format()) == t


@pytest.mark.parametrize(
    "text",
    ["", "a:", ":b", "a:b:c", "a b", "../etc", "a@", "@torch", "x" * 301, "a:b@torch@onnx", None, 3, ["m"]],
)
def test_malformed_strings_are_invalid_requests(text):
    with pytest.raises((InvalidRequest, VariantNotFound)) as info:
        Target.parse(text)
    assert info.value.param == "model"


def test_unknown_variant_is_not_found():
    with pytest.raises(VariantNotFound, match="variants are torch, onnx, onnx-int8"):
        Target.parse("minilm@fp16")
