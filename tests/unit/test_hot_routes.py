"""The hot routes' dispatch in ``serve.ingress.app._App``: a POST to one of them reaches its
handler without FastAPI building or running its middleware stack; anything else goes through
FastAPI. (Through HTTP and Ray, tests/integration/test_api.py answers them.)"""

import asyncio

import pytest
from starlette.responses import Response

from serve.ingress import HOT_PATHS
from serve.ingress import app as app_module


def call(app, method: str, path: str) -> list[dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": [],
             "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    return sent


@pytest.fixture
def fresh_app(monkeypatch):
    seen = []

    async def handler(request):
        seen.append((request.method, request.url.path))
        return Response(b"hot", status_code=200)

    app = app_module._App(docs_url=None, redoc_url=None)
    monkeypatch.setattr(app_module._App, "hot", dict.fromkeys(HOT_PATHS, handler))
    return app, seen


def test_a_post_to_a_hot_route_skips_fastapi(fresh_app):
    app, seen = fresh_app
    for path in HOT_PATHS:
        sent = call(app, "POST", path)
        assert sent[0]["status"] == 200 and sent[1]["body"] == b"hot"
    assert seen == [("POST", p) for p in HOT_PATHS]
    assert app.middleware_stack is None  # FastAPI never built its stack


def test_other_methods_and_paths_go_through_fastapi(fresh_app):
    app, seen = fresh_app
    assert call(app, "GET", HOT_PATHS[0])[0]["status"] == 404  # no FastAPI route on this bare app
    assert call(app, "POST", "/v1/other")[0]["status"] == 404
    assert seen == [] and app.middleware_stack is not None


def test_the_routes_haproxy_marks_are_the_ones_dispatched():
    from serve.haproxy import NO_DISCONNECT_WATCH

    assert set(app_module._App.hot) == set(HOT_PATHS)
    assert app_module._App.hot["/v1/embeddings"] is app_module._embeddings
    assert "{ path " + " ".join(HOT_PATHS) + " }" in NO_DISCONNECT_WATCH
