"""LoRA adapters on the torch backend: every served output equals peft's own output for that
adapter alone, also when rows of different adapters share one forward pass, and after removal
and reload. References are computed with plain transformers + ``PeftModel.from_pretrained``.
"""

import numpy as np
import pytest
import torch

from models.adapters import base_weight_shapes, validate_adapter
from models.factory import create_backend
from models.spec import ModelSpec
from tests.conftest import make_adapter, peft_reference

TEXTS = ["the market rallied today", "a thrilling final match", "quiet", "new telescope images of a far galaxy"]


@pytest.fixture(scope="module")
def store(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(tiny_models["embed"], root / "cls-a", task="classify", seed=11)
    make_adapter(tiny_models["embed"], root / "cls-b", task="classify", seed=12, rank=8, targets=("query", "key", "value", "dense"))
    make_adapter(tiny_models["embed"], root / "emb-a", task="embed", seed=13)
    make_adapter(tiny_models["classify"], root / "topic-a", task="classify", seed=14)
    return root


def backend(tiny_models, kind):
    b = create_backend(ModelSpec(id=kind, source=str(tiny_models[kind]), task=kind), "torch")
    b.load()
    return b


def add(b, tiny_models, store, name, task, base_kind):
    check = validate_adapter(name, [store], base_shapes=base_weight_shapes(tiny_models[base_kind]), task="classify" if task == "classify" else "embed", max_rank=64)
    b.add_adapter(name, check, task)


def test_classify_base_equals_transformers(tiny_models):
    from transformers import AutoModelForSequenceClassification

    b = backend(tiny_models, "classify")
    ref_model = AutoModelForSequenceClassification.from_pretrained(tiny_models["classify"]).eval()
    enc = b.encoder.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = torch.softmax(ref_model(**enc).logits, -1).numpy()
    np.testing.assert_allclose(b.predict(b.encode(TEXTS)), ref, atol=1e-5)


@pytest.mark.parametrize("name, task, base_kind", [("cls-a", "classify", "embed"), ("cls-b", "classify", "embed"),
                                                    ("emb-a", "embed", "embed"), ("topic-a", "classify", "classify")])
def test_each_adapter_alone_equals_peft(tiny_models, store, name, task, base_kind):
    b = backend(tiny_models, base_kind)
    add(b, tiny_models, store, name, task, base_kind)
    got = np.stack(b.predict(b.encode(TEXTS), [name] * len(TEXTS)))
    ref = peft_reference(tiny_models[base_kind], store / name, task, TEXTS, b.encoder.tokenizer)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    if task == "classify":
        assert got.shape == (len(TEXTS), 2 if base_kind == "embed" else 4)


def test_mixed_batch_has_no_cross_talk_and_base_rows_stay_base(tiny_models, store):
    b = backend(tiny_models, "embed")
    rows = b.encode(TEXTS)
    base_alone = b.predict(rows)
    for name, task in (("cls-a", "classify"), ("cls-b", "classify"), ("emb-a", "embed")):
        add(b, tiny_models, store, name, task, "embed")
    plan = [None, "cls-a", "emb-a", "cls-b", None, "cls-b", "emb-a", "cls-a"]
    batch_rows = [rows[i % len(rows)] for i in range(len(plan))]
    mixed = b.predict(batch_rows, plan)
    for i, adapter in enumerate(plan):
        alone = b.predict([batch_rows[i]], [adapter])
        alone = alone[0] if isinstance(alone, list) else alone[0]
        np.testing.assert_allclose(mixed[i], alone, atol=1e-5, err_msg=f"row {i} ({adapter})")
    np.testing.assert_allclose(np.stack([mixed[0], mixed[4]]), base_alone[[0, 0]], atol=1e-5)
    assert mixed[1].shape == (2,) and mixed[2].shape == (32,)


def test_remove_and_reload_give_identical_outputs(tiny_models, store):
    b = backend(tiny_models, "embed")
    rows = b.encode(TEXTS)
    before = b.predict(rows)
    add(b, tiny_models, store, "cls-a", "classify", "embed")
    first = np.stack(b.predict(rows, ["cls-a"] * len(rows)))
    b.remove_adapter("cls-a")
    np.testing.assert_allclose(b.predict(rows), before, atol=1e-6)
    add(b, tiny_models, store, "cls-a", "classify", "embed")
    np.testing.assert_allclose(np.stack(b.predict(rows, ["cls-a"] * len(rows))), first, atol=1e-6)


def test_loads_and_removals_beside_running_forward_passes_leave_outputs_exact(tiny_models, store):
    """Slots let adapters come and go on another thread while batches run (stack growth and
    rank growth included): a fixed adapter's rows stay exactly what they were."""
    import threading

    b = backend(tiny_models, "embed")
    add(b, tiny_models, store, "cls-a", "classify", "embed")
    rows = b.encode(TEXTS)
    expected = np.stack(b.predict(rows, ["cls-a"] * len(TEXTS)))
    mixed_expected = b.predict(rows, ["cls-a", None, "cls-a", None])
    stop = threading.Event()
    errors = []

    def churn():
        check_small = validate_adapter("emb-a", [store], base_shapes=base_weight_shapes(tiny_models["embed"]), task="embed", max_rank=64)
        check_big = validate_adapter("cls-b", [store], base_shapes=base_weight_shapes(tiny_models["embed"]), task="classify", max_rank=64)
        i = 0
        try:
            while not stop.is_set():
                names = [f"churn-{i}-{k}" for k in range(5)]  # grows the slot stacks
                for k, n in enumerate(names):
                    if k % 2:
                        b.add_adapter(n, check_big, "classify")  # rank 8: grows the rank
                    else:
                        b.add_adapter(n, check_small, "embed")
                for n in names:
                    b.remove_adapter(n)
                i += 1
        except Exception as exc:  # surfaced below
            errors.append(exc)

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(30):
            np.testing.assert_array_equal(np.stack(b.predict(rows, ["cls-a"] * len(TEXTS))), expected)
            got = b.predict(rows, ["cls-a", None, "cls-a", None])
            for g, e in zip(got, mixed_expected):
                np.testing.assert_allclose(g, e, atol=1e-6)
    finally:
        stop.set()
        t.join(30)
    assert errors == []
