"""The admin API over HTTP: every bad adapter of the issue is refused with its 4xx, registers
nothing and disturbs nobody; names, bases, bodies and keys are checked.

The bad adapters are built by the same table as the model-layer unit test
(``tests/unit/test_adapter_validation.py``), here inside the service's real store root.
"""

import pytest

from tests.integration.conftest import ADMIN_KEY
from tests.unit.test_adapter_validation import BAD

GOOD = {"model": "topics", "input": ["a calm sentence"]}


def registered_names(admin):
    r = admin.get("/v1/adapters")
    assert r.status_code == 200, r.text
    return {a["name"] for a in r.json()["data"]}


def assert_refused(admin, client, body, status, code, message=""):
    before = registered_names(admin)
    r = admin.post("/v1/load_lora_adapter", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and message in err["message"], err
    assert "request_id" in r.json()
    assert registered_names(admin) == before  # nothing registered
    assert client.post("/v1/classify", json=GOOD).status_code == 200  # nobody disturbed


@pytest.mark.parametrize("case, make, message", BAD, ids=[b[0] for b in BAD])
def test_bad_adapter_is_refused(admin, client, adapter_store, tmp_path, case, make, message):
    path = make(adapter_store, tmp_path)
    body = {"lora_name": "bad-one", "lora_path": path, "base_model_name": "topics"}
    assert_refused(admin, client, body, 400, "invalid_adapter", message)


@pytest.mark.parametrize("body, status, code, message", [
    ({"lora_name": "x", "lora_path": "topic-1", "base_model_name": "nope"}, 404, "model_not_found", "no base model"),
    ({"lora_name": "sentiment", "lora_path": "topic-1", "base_model_name": "topics"}, 409, "conflict", "already registered"),
    ({"lora_name": "tiny", "lora_path": "topic-1", "base_model_name": "topics"}, 409, "conflict", "name of a base model"),
    ({"lora_name": "a:b", "lora_path": "topic-1", "base_model_name": "topics"}, 400, "invalid_adapter", "must match"),
    ({"lora_name": "", "lora_path": "topic-1"}, 400, "invalid_adapter", "1..64 characters"),
    ({"lora_name": "x", "lora_path": "topic-1", "base_model_name": "minilm"}, 400, "invalid_adapter", "do not fit the base weight"),
    ({"lora_name": "x"}, 400, "invalid_request", "lora_path"),
    ({"lora_name": "x", "lora_path": "topic-1", "surprise": 1}, 400, "invalid_request", ""),
    ({"lora_name": 5, "lora_path": "topic-1"}, 400, "invalid_request", ""),
], ids=["unknown base", "name taken", "base name", "bad name", "empty name", "shapes of another base",
        "missing lora_path", "unknown field", "wrong type"])
def test_bad_load_requests(admin, client, body, status, code, message):
    assert_refused(admin, client, body, status, code, message)


def test_a_task_the_base_does_not_serve(admin, client, adapter_store):
    import json
    import shutil

    d = adapter_store / "causal"
    if not d.exists():
        shutil.copytree(adapter_store / "topic-1", d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, "task_type": "CAUSAL_LM"}))
    body = {"lora_name": "causal", "lora_path": "causal", "base_model_name": "topics"}
    assert_refused(admin, client, body, 400, "invalid_adapter", "does not fit a base serving 'classify'")


def test_name_taken_by_a_runtime_adapter_needs_replace(admin, client):
    body = {"lora_name": "twice", "lora_path": "topic-1", "base_model_name": "topics"}
    assert admin.post("/v1/load_lora_adapter", json=body).status_code == 200
    try:
        assert_refused(admin, client, {**body, "lora_path": "topic-2"}, 409, "conflict", "replace: true")
        r = admin.post("/v1/load_lora_adapter", json={**body, "lora_path": "topic-2", "replace": True})
        assert r.status_code == 200 and r.json()["path"].endswith("topic-2")
        assert client.post("/v1/classify", json={**GOOD, "model": "twice"}).status_code == 200
    finally:
        admin.post("/v1/unload_lora_adapter", json={"lora_name": "twice"})


def test_base_inferred_from_the_adapter_config(admin, client):
    """No base_model_name: the adapter config's base (a local path of the tiny classifier)."""
    r = admin.post("/v1/load_lora_adapter", json={"lora_name": "inferred", "lora_path": "topic-2"})
    assert r.status_code == 200, r.text
    assert r.json()["base"] == "topics"
    admin.post("/v1/unload_lora_adapter", json={"lora_name": "inferred"})


def test_config_adapters_cannot_be_unloaded_at_runtime(admin):
    r = admin.post("/v1/unload_lora_adapter", json={"lora_name": "sentiment"})
    assert r.status_code == 409 and "config" in r.json()["error"]["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic " + ADMIN_KEY}])
def test_admin_routes_need_the_admin_key(client, headers):
    for method, path in [("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"), ("GET", "/v1/adapters")]:
        r = client.request(method, path, headers=headers, json={"lora_name": "x", "lora_path": "topic-1"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)


def test_admin_body_checks(admin):
    r = admin.post("/v1/load_lora_adapter", content=b"lora", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = admin.post("/v1/load_lora_adapter", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
