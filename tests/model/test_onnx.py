"""ONNX variants: export and cache, the parity gate, LoRA on ONNX equal to peft (mixed batches
too), thresholds from the config, and the export CLI. Refused and replaced files:
``test_onnx_faults.py``.

Everything runs on the real stack (optimum export, onnxruntime sessions, peft references) with
the tiny seeded BERTs of ``tests/conftest.py`` (fixtures: ``tests/model/conftest.py``).
"""

import asyncio
import json

import numpy as np
import pytest

from models.factory import create_backend
from models.onnx_graph import MANIFEST
from models.variants.build import ensure_variants
from models.variants.cache import cpu_quantization, variant_root
from serve.server.local import ModelServer
from tests.conftest import TOPIC_LABELS, peft_reference
from tests.model.conftest import TEXTS, VARIANTS, add, loaded, spec_of


def test_cpu_quantization_names_an_optimum_config():
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    assert hasattr(AutoQuantizationConfig, cpu_quantization())


def test_build_is_cached_by_content_and_settings(tiny_models, cache):
    spec = spec_of(tiny_models, "embed")
    root = variant_root(spec, tiny_models["embed"], cache)
    stamp = (root / "onnx" / "model.onnx").stat().st_mtime_ns
    said = []
    assert ensure_variants(spec, cache, progress=said.append) == root
    assert (root / "onnx" / "model.onnx").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert said == [f"tiny-embed: ONNX variants cached in {root}"]
    manifest = json.loads((root / "onnx-int8" / MANIFEST).read_text())
    assert manifest["settings"]["quantization"] == cpu_quantization()
    assert manifest["parity_at_build"]["passed"]
    # other build settings -> another key
    other = spec.model_copy(update={"onnx": spec.onnx.model_copy(update={"per_channel": False})})
    assert variant_root(other, tiny_models["embed"], cache) != root
    # what changes torch's outputs (and so the references) -> another key too
    assert variant_root(spec.model_copy(update={"normalize": False}), tiny_models["embed"], cache) != root
    assert variant_root(spec.model_copy(update={"pooling": "cls"}), tiny_models["embed"], cache) != root


@pytest.mark.parametrize("kind", ["embed", "classify"])
def test_fp32_equals_torch_and_int8_is_close(tiny_models, cache, kind):
    spec = spec_of(tiny_models, kind)
    torch_b = loaded(spec, "torch", cache)
    ref = torch_b.predict(torch_b.encode(TEXTS))
    fp32 = loaded(spec, "onnx", cache)
    assert np.abs(fp32.predict(fp32.encode(TEXTS)) - ref).max() <= 1e-5
    int8 = loaded(spec, "onnx-int8", cache)
    got = int8.predict(int8.encode(TEXTS))
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.99
    if kind == "classify":
        assert fp32.labels == TOPIC_LABELS


@pytest.mark.parametrize("variant", ["onnx", "onnx-int8"])
@pytest.mark.parametrize("name, task, kind", [("cls-a", "classify", "embed"), ("cls-b", "classify", "embed"),
                                              ("emb-a", "embed", "embed"), ("topic-a", "classify", "classify")])
def test_adapter_on_onnx_equals_peft(tiny_models, cache, store, variant, name, task, kind):
    b = loaded(spec_of(tiny_models, kind), variant, cache)
    add(b, tiny_models[kind], store, name, task)
    got = np.stack(b.predict(b.encode(TEXTS), [name] * len(TEXTS)))
    ref = peft_reference(tiny_models[kind], store / name, task, TEXTS, b.encoder.tokenizer)
    np.testing.assert_allclose(got, ref, atol=1e-4 if variant == "onnx" else 2e-2)
    if variant == "onnx":
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_mixed_batch_rows_equal_their_single_adapter_runs(tiny_models, cache, store):
    b = loaded(spec_of(tiny_models, "embed"), "onnx", cache)
    for name, task in (("cls-a", "classify"), ("cls-b", "classify"), ("emb-a", "embed")):
        add(b, tiny_models["embed"], store, name, task)
    rows = b.encode(TEXTS)
    plan = ["cls-a", None, "emb-a", "cls-b"]
    mixed = b.predict(rows, plan)
    for i, name in enumerate(plan):
        alone = b.predict([rows[i]], [name])
        np.testing.assert_allclose(mixed[i], np.asarray(alone)[0], atol=1e-6)
    base = b.predict([rows[1]])
    np.testing.assert_allclose(mixed[1], base[0], atol=1e-6)


def test_remove_then_reload_reuses_the_slot_and_stays_exact(tiny_models, cache, store):
    b = loaded(spec_of(tiny_models, "embed"), "onnx", cache)
    add(b, tiny_models["embed"], store, "cls-a", "classify")
    first = np.stack(b.predict(b.encode(TEXTS), ["cls-a"] * 4))
    slot = b.slots.slot_of["cls-a"]
    b.remove_adapter("cls-a")
    add(b, tiny_models["embed"], store, "cls-b", "classify")  # rank 8: stacks grow
    assert b.slots.slot_of["cls-b"] == slot
    add(b, tiny_models["embed"], store, "cls-a", "classify")
    np.testing.assert_array_equal(np.stack(b.predict(b.encode(TEXTS), ["cls-a"] * 4)), first)


def test_thresholds_come_from_config(tiny_models, cache):
    strict = spec_of(tiny_models, "embed", onnx={"reload_poll_s": 0, "parity": {"fp32_max_abs_diff": 1e-12}})

    async def run():
        from functools import partial

        server = ModelServer(strict, "onnx", partial(create_backend, variant_cache=cache)).load()
        assert (await server.variant_info())["status"] == "failed"
        assert "> 1e-12" in server.lifecycle.info["reason"]
        server.close()

    asyncio.run(run())


def test_export_cli_builds_then_reuses_the_cache(tiny_models, tmp_path, capfd):
    import yaml

    from serve.cli import main

    config = {"applications": [{"name": "x", "import_path": "serve.app:build_app", "args": {
        "models": [{"id": "cli-tiny", "source": str(tiny_models["embed"]), "task": "embed",
                    "variants": list(VARIANTS)}],
        "variants": {"cache_dir": str(tmp_path / "cache")}}}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["export", "--config", str(path)]) == 0
    out = capfd.readouterr().out
    assert "cli-tiny: exporting" in out and "cli-tiny@onnx: parity passed" in out
    assert "cli-tiny@onnx-int8: parity passed" in out
    assert main(["export", "--config", str(path)]) == 0
    assert "cli-tiny: ONNX variants cached in" in capfd.readouterr().out
    # a model whose checkpoint cannot be exported: the command says so and fails
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "nonsense"}')
    config["applications"][0]["args"]["models"][0]["source"] = str(bad)
    path.write_text(yaml.safe_dump(config))
    assert main(["export", "--config", str(path)]) == 1
    assert "building ONNX variants failed" in capfd.readouterr().err

