"""RouterCore without Ray: a plain FastAPI app over the real ModelServer on a tiny model."""

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from models.factory import create_backend
from serve.ingress.core import RouterCore
from serve.ingress.schemas import EmbeddingsRequest
from serve.server.local import ModelServer
from serve.settings import AppSettings


@pytest.fixture(scope="module")
def app_client(tiny_models):
    import os

    os.environ["ROUTER_TEST_KEYS"] = "k1,k2"
    settings = AppSettings.model_validate(
        {
            "models": [{"id": "tiny", "source": str(tiny_models["embed"]), "task": "embed"}],
            "auth": {"api_keys_env": "ROUTER_TEST_KEYS"},
        }
    )
    server = ModelServer(settings.models[0], "torch", create_backend).load()
    core = RouterCore(settings, {("tiny", "torch"): server})
    app = FastAPI()

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await core.handle(request, "embeddings", EmbeddingsRequest, core.embeddings)

    with TestClient(app) as c:
        yield c
    server.close()


BODY = {"model": "tiny", "input": "hi"}


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "k1"}, {"Authorization": "Basic k1"}]
)
def test_missing_or_bad_key_is_401_before_the_body_is_read(app_client, headers):
    # the body is not even JSON: a 401 (not 400/415) proves auth ran first
    r = app_client.post("/v1/embeddings", content=b"not json", headers=headers)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("key", ["k1", "k2"])
def test_valid_keys_pass(app_client, key):
    r = app_client.post("/v1/embeddings", json=BODY, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 32
