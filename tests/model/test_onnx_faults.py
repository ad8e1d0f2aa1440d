"""ONNX variants that must not serve: refused files (custom domains, external data that
escapes, bad inputs), variants failing parity, and replaced files that a serving replica takes
only once they pass parity in it. Each test that damages files works on a copy of the cache.
"""

import asyncio
import shutil

import numpy as np
import onnx
import pytest

from models.errors import ModelLoadError, VariantUnavailable
from models.factory import create_backend
from models.onnx_graph import check_model_file
from models.variants.cache import variant_root
from serve.server.local import ModelServer
from tests.model.conftest import TEXTS, loaded, spec_of
from tests.waiting import async_wait_until


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

