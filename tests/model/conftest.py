"""Fixtures and helpers of the ONNX variant tests (test_onnx.py, test_onnx_faults.py): the tiny
seeded BERTs' variants built once per session, and the adapters they are checked with."""

import pytest

from models.adapters import base_weight_shapes, validate_adapter
from models.factory import create_backend
from models.spec import ModelSpec
from models.variants.build import ensure_variants
from tests.conftest import make_adapter

TEXTS = ["the market rallied today", "a thrilling final match", "quiet", "new telescope images of a far galaxy"]
VARIANTS = ("torch", "onnx", "onnx-int8")


def spec_of(tiny_models, kind, **kw):
    return ModelSpec(id=f"tiny-{kind}", source=str(tiny_models[kind]), task=kind, variants=VARIANTS, **kw)


@pytest.fixture(scope="session")
def cache(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    for kind in ("embed", "classify"):
        ensure_variants(spec_of(tiny_models, kind), root)
    return root


@pytest.fixture(scope="session")
def store(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-adapters")
    make_adapter(tiny_models["embed"], root / "cls-a", task="classify", seed=21)
    make_adapter(tiny_models["embed"], root / "cls-b", task="classify", seed=22, rank=8,
                 targets=("query", "key", "value", "dense"))
    make_adapter(tiny_models["embed"], root / "emb-a", task="embed", seed=23)
    make_adapter(tiny_models["classify"], root / "topic-a", task="classify", seed=24)
    return root


def loaded(spec, variant, cache):
    b = create_backend(spec, variant, variant_cache=cache)
    b.load()
    return b


def add(b, base_dir, store, name, task):
    check = validate_adapter(name, [store], base_shapes=base_weight_shapes(base_dir), task=task, max_rank=64)
    b.add_adapter(name, check, task)

