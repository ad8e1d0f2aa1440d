"""ONNX variants: export and cache, the parity gate, LoRA on ONNX equal to peft (mixed batches
too), refused files, and replacement of a serving variant's files.

Everything runs on the real stack (optimum export, onnxruntime sessions, peft references) with
the tiny seeded BERTs of ``tests/conftest.py``; each test that damages files works on a copy.
"""

import asyncio
import json
import shutil

import numpy as np
import onnx
import pytest

from models.adapters import base_weight_shapes, validate_adapter
from models.errors import ModelLoadError, VariantUnavailable
from models.factory import create_backend
from models.onnx_graph import MANIFEST, check_model_file
from models.spec import ModelSpec
from models.variants.build import ensure_variants
from models.variants.cache import cpu_quantization, variant_root
from serve.server.local import ModelServer
from tests.conftest import TOPIC_LABELS, make_adapter, peft_reference
from tests.waiting import async_wait_until

TEXTS = ["the market rallied today", "a thrilling final match", "quiet", "new telescope images of a far galaxy"]
VARIANTS = ("torch", "onnx", "onnx-int8")


def spec_of(tiny_models, kind, **kw):
    return ModelSpec(id=f"tiny-{kind}", source=str(tiny_models[kind]), task=kind, variants=VARIANTS, **kw)


@pytest.fixture(scope="module")
def cache(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    for kind in ("embed", "classify"):
        ensure_variants(spec_of(tiny_models, kind), root)
    return root


@pytest.fixture(scope="module")
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


def _custom_domain_model(path):
    from onnx import TensorProto, helper

    node = helper.make_node("Evil", ["x"], ["y"], domain="com.example.evil")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.example.evil", 1)]), path)


def _external_data_escape(path, good):
    model = onnx.load(str(good))
    tensor = model.graph.initializer[0]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../../../etc/passwd"
    tensor.ClearField("raw_data")
    onnx.save(model, str(path))


BAD_FILES = {
    "garbage bytes": (lambda p, good: p.write_bytes(b"\x08\x07not a protobuf at all" * 50), "not a readable ONNX model"),
    "empty file": (lambda p, good: p.write_bytes(b""), "has 0 bytes"),
    "truncated model": (lambda p, good: p.write_bytes(good.read_bytes()[: good.stat().st_size // 3]), "not a readable ONNX model"),
    "custom operator domain": (lambda p, good: _custom_domain_model(p), "operator domains ['com.example.evil']"),
    "external data outside": (_external_data_escape, "is stored as external data"),
    "external data in a Constant node": (lambda p, good: _constant_external(p), "is stored as external data"),
    "custom domain inside an If branch": (lambda p, good: _nested_custom_domain(p), "operator domains ['com.example.evil']"),
    "another model's graph": (lambda p, good: _custom_io_model(p), "is not this model's encoder graph"),
}


def _constant_external(path):
    from onnx import TensorProto, helper

    value = helper.make_tensor("c", TensorProto.FLOAT, [1], [1.0])
    value.data_location = TensorProto.EXTERNAL
    entry = value.external_data.add()
    entry.key, entry.value = "location", "../outside/secret.bin"
    value.ClearField("float_data")
    node = helper.make_node("Constant", [], ["y"], value=value)
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _nested_custom_domain(path):
    from onnx import TensorProto, helper

    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    evil = helper.make_graph([helper.make_node("Evil", [], ["y"], domain="com.example.evil")], "then", [], [out])
    plain = helper.make_graph([helper.make_node("Constant", [], ["y"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]))], "else", [], [out])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=evil, else_branch=plain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [out])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _custom_io_model(path):
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["input_ids"], ["out"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("out", TensorProto.INT64, ["b", "s"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.fixture
def private_cache(cache, tmp_path):
    """A copy of the cache a test may damage."""
    dest = tmp_path / "variants"
    shutil.copytree(cache, dest)
    return dest


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_onnx_file_fails_at_load_with_a_clear_message(tiny_models, private_cache, case):
    spec = spec_of(tiny_models, "embed")
    folder = variant_root(spec, tiny_models["embed"], private_cache) / "onnx"
    good = folder.parent / "good.onnx"
    shutil.copy(folder / "model.onnx", good)
    make, message = BAD_FILES[case]
    make(folder / "model.onnx", good)
    with pytest.raises(ModelLoadError, match=message.replace("[", r"\[").replace("]", r"\]")):
        loaded(spec, "onnx", private_cache)
    if case not in ("empty file", "another model's graph"):
        with pytest.raises(ModelLoadError):
            check_model_file(folder / "model.onnx")


def test_model_server_keeps_running_with_a_broken_variant(tiny_models, private_cache):
    spec = spec_of(tiny_models, "embed", onnx={"reload_poll_s": 0})
    folder = variant_root(spec, tiny_models["embed"], private_cache) / "onnx"
    (folder / "lora.onnx").write_bytes(b"broken")

    async def run():
        from functools import partial

        server = ModelServer(spec, "onnx", partial(create_backend, variant_cache=private_cache)).load()
        info = await server.variant_info()
        assert info["status"] == "failed" and "lora.onnx is not a readable ONNX model" in info["reason"]
        assert server.alive()  # the replica is not restarted for it
        with pytest.raises(VariantUnavailable, match="not a readable ONNX model"):
            await server.embed(["hello"])
        with pytest.raises(VariantUnavailable):
            await server.health()
        server.close()

    asyncio.run(run())


def _perturb(path, factor=1.5):
    """Same graph, other weights: the file loads fine and fails parity."""
    model = onnx.load(str(path))
    from onnx import numpy_helper

    for i, init in enumerate(model.graph.initializer):
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.ndim == 2:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr * factor, init.name))
    onnx.save(model, str(path))


@pytest.mark.parametrize("damaged", ["model.onnx", "lora.onnx"])
def test_variant_failing_parity_is_not_served_and_says_why(tiny_models, private_cache, damaged):
    """Either graph with other weights fails the gate: the LoRA graph serves every adapter
    request, so it is checked too (with every row on the zero slot)."""
    spec = spec_of(tiny_models, "embed", onnx={"reload_poll_s": 0})
    folder = variant_root(spec, tiny_models["embed"], private_cache) / "onnx"
    _perturb(folder / damaged)

    async def run():
        from functools import partial

        server = ModelServer(spec, "onnx", partial(create_backend, variant_cache=private_cache)).load()
        info = await server.variant_info()
        assert info["status"] == "failed"
        assert info["reason"].startswith("tiny-embed@onnx is not served: parity with torch failed: max abs diff")
        assert info["parity"]["passed"] is False and info["parity"]["max_abs_diff"] > 1e-4
        with pytest.raises(VariantUnavailable, match="parity"):
            await server.embed(["hello"])
        server.close()

    asyncio.run(run())


def _cut_lora_branches(path):
    """A LoRA graph with the right inputs whose branches are disconnected: bare-base rows
    still match torch, adapter rows would silently serve the bare base."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.name.endswith("/lora/Add"):
            node.op_type = "Identity"
            del node.input[1:]
    onnx.save(model, str(path))


@pytest.mark.parametrize("variant", ["onnx", "onnx-int8"])
def test_lora_graph_that_ignores_adapters_fails_parity(tiny_models, private_cache, variant):
    spec = spec_of(tiny_models, "embed", onnx={"reload_poll_s": 0})
    folder = variant_root(spec, tiny_models["embed"], private_cache) / variant
    _cut_lora_branches(folder / "lora.onnx")

    async def run():
        from functools import partial

        server = ModelServer(spec, variant, partial(create_backend, variant_cache=private_cache)).load()
        info = await server.variant_info()
        assert info["status"] == "failed"
        assert "with the probe adapter" in info["reason"]
        assert info["parity"]["adapter_probe"]["mean_cosine"] < 0.99
        server.close()

    asyncio.run(run())


def test_thresholds_come_from_config(tiny_models, cache):
    strict = spec_of(tiny_models, "embed", onnx={"reload_poll_s": 0, "parity": {"fp32_max_abs_diff": 1e-12}})

    async def run():
        from functools import partial

        server = ModelServer(strict, "onnx", partial(create_backend, variant_cache=cache)).load()
        assert (await server.variant_info())["status"] == "failed"
        assert "> 1e-12" in server.lifecycle.info["reason"]
        server.close()

    asyncio.run(run())


def test_reload_swaps_only_files_that_pass_parity_and_keeps_adapters(tiny_models, private_cache, store):
    import hashlib
    from functools import partial

    from models.adapters import AdapterRef

    spec = spec_of(tiny_models, "embed", onnx={"reload_poll_s": 0})
    folder = variant_root(spec, tiny_models["embed"], private_cache) / "onnx"
    pristine = onnx.load(str(folder / "model.onnx"))
    weights = (store / "cls-a" / "adapter_model.safetensors").read_bytes()
    ref = AdapterRef(name="cls-a", base=spec.id, path=str(store / "cls-a"), rank=4,
                     sha256=hashlib.sha256(weights).hexdigest(), task="classify", labels=("no", "yes"))

    async def run():
        server = ModelServer(spec, "onnx", partial(create_backend, variant_cache=private_cache),
                             store_roots=[store]).load()
        adapted = (await server.classify(TEXTS, adapter=ref)).values
        base = (await server.embed(TEXTS)).values
        old_files = (await server.variant_info())["files"]

        # a replacement that loads but fails parity: rejected, the old session keeps serving
        _perturb(folder / "model.onnx")
        info = await server.reload()
        assert info["status"] == "serving" and info["files"] == old_files
        assert info["last_reload"]["result"] == "rejected"
        assert "parity with torch failed" in info["last_reload"]["reason"]
        np.testing.assert_array_equal((await server.embed(TEXTS)).values, base)

        # a corrupt one: rejected the same way
        (folder / "model.onnx").write_bytes(b"\x00" * 100)
        info = await server.reload()
        assert info["last_reload"]["result"] == "rejected" and "not a readable ONNX model" in info["last_reload"]["reason"]

        # a valid one (same weights, other bytes): swapped in, the resident adapter re-added
        pristine.doc_string = "re-exported"
        onnx.save(pristine, str(folder / "model.next"))
        (folder / "model.next").replace(folder / "model.onnx")
        info = await server.reload()
        assert info["last_reload"]["result"] == "replaced"
        assert info["files"]["model.onnx"] != old_files["model.onnx"]
        assert info["files"]["lora.onnx"] == old_files["lora.onnx"]
        np.testing.assert_allclose((await server.embed(TEXTS)).values, base, atol=1e-6)
        np.testing.assert_allclose((await server.classify(TEXTS, adapter=ref)).values, adapted, atol=1e-6)
        assert server.adapters.resident() == ["cls-a"]

        # a resident adapter whose file changed on disk: the reload is refused rather than
        # serving new content under the old key
        weights_path = store / "cls-a" / "adapter_model.safetensors"
        original = weights_path.read_bytes()
        try:
            weights_path.write_bytes(original[:-8] + bytes(8))
            pristine.doc_string = "re-exported again"
            onnx.save(pristine, str(folder / "model.next"))
            (folder / "model.next").replace(folder / "model.onnx")
            info = await server.reload()
            assert info["last_reload"]["result"] == "rejected"
            assert "'cls-a' changed on disk" in info["last_reload"]["reason"]
            np.testing.assert_allclose((await server.classify(TEXTS, adapter=ref)).values, adapted, atol=1e-6)
        finally:
            weights_path.write_bytes(original)
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


def test_watcher_picks_up_replaced_files_and_outlives_a_failing_reload(tiny_models, private_cache):
    """The polling loop itself: a replaced file is tried once it holds still, an exception in a
    reload is logged and the loop goes on, a missing file triggers nothing."""
    from functools import partial

    spec = spec_of(tiny_models, "embed", onnx={"reload_poll_s": 0.1})
    folder = variant_root(spec, tiny_models["embed"], private_cache) / "onnx"
    pristine = onnx.load(str(folder / "model.onnx"))

    def replace(tag):
        pristine.doc_string = tag
        onnx.save(pristine, str(folder / "model.next"))
        (folder / "model.next").replace(folder / "model.onnx")

    async def until(predicate):
        await async_wait_until(predicate, "the watcher to act")

    async def run():
        server = ModelServer(spec, "onnx", partial(create_backend, variant_cache=private_cache)).load()
        first = (await server.variant_info())["files"]["model.onnx"]
        real_reload, calls = server.lifecycle.reload, []

        async def failing_once():
            calls.append(1)
            if len(calls) == 1:
                server.lifecycle._signature = server.lifecycle.signature()
                raise RuntimeError("boom")
            return await real_reload()

        server.lifecycle.reload = failing_once
        replace("one")
        await until(lambda: len(calls) == 1)  # it raised inside the watcher
        replace("two")
        await until(lambda: (server.lifecycle.info.get("last_reload") or {}).get("result") == "replaced")
        assert server.lifecycle.info["files"]["model.onnx"] != first
        assert server._watcher is not None and not server._watcher.done()
        # a missing file (mid-replacement, or a cleaned cache) does not trigger a reload
        (folder / "model.onnx").rename(folder / "model.away")
        await asyncio.sleep(0.5)
        assert len(calls) == 2
        server.close()

    asyncio.run(run())
