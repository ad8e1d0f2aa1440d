"""Every bad input answers its 4xx in the OpenAI error envelope, and the next request works."""

import json

import pytest

from tests.integration.conftest import MAX_BODY, MAX_INPUTS

GOOD = {"model": "tiny", "input": "a good request"}
JSON_CT = {"content-type": "application/json"}


def raw(body: str) -> dict:
    return {"content": body.encode("utf-8", "surrogatepass"), "headers": JSON_CT}


CASES = [
    # id, route, request kwargs, status, code
    ("unknown model", "/v1/embeddings", {"json": {"model": "nope", "input": "x"}}, 404, "model_not_found"),
    ("unknown adapter", "/v1/embeddings", {"json": {"model": "tiny:sentiment", "input": "x"}}, 404, "adapter_not_found"),
    ("unknown variant", "/v1/embeddings", {"json": {"model": "tiny@fp16", "input": "x"}}, 404, "variant_not_found"),
    ("variant not served", "/v1/embeddings", {"json": {"model": "topics@onnx-int8", "input": "x"}}, 404, "variant_not_found"),
    ("malformed model string", "/v1/embeddings", {"json": {"model": "a:b:c", "input": "x"}}, 400, "invalid_request"),
    ("missing model", "/v1/embeddings", {"json": {"input": "x"}}, 400, "invalid_request"),
    ("missing input", "/v1/embeddings", {"json": {"model": "tiny"}}, 400, "invalid_request"),
    ("empty string", "/v1/embeddings", {"json": {"model": "tiny", "input": ""}}, 400, "invalid_request"),
    ("empty list", "/v1/embeddings", {"json": {"model": "tiny", "input": []}}, 400, "invalid_request"),
    ("empty string in list", "/v1/embeddings", {"json": {"model": "tiny", "input": ["ok", ""]}}, 400, "invalid_request"),
    ("empty token array", "/v1/embeddings", {"json": {"model": "tiny", "input": [[]]}}, 400, "invalid_request"),
    ("model not a string", "/v1/embeddings", {"json": {"model": 5, "input": "x"}}, 400, "invalid_request"),
    ("input a number", "/v1/embeddings", {"json": {"model": "tiny", "input": 5}}, 400, "invalid_request"),
    ("input an object", "/v1/embeddings", {"json": {"model": "tiny", "input": {"a": 1}}}, 400, "invalid_request"),
    ("float token ids", "/v1/embeddings", {"json": {"model": "tiny", "input": [1.5, 2]}}, 400, "invalid_request"),
    ("mixed list", "/v1/embeddings", {"json": {"model": "tiny", "input": ["a", 1]}}, 400, "invalid_request"),
    ("negative token id", "/v1/embeddings", {"json": {"model": "tiny", "input": [-1]}}, 400, "invalid_request"),
    ("token id past vocab", "/v1/embeddings", {"json": {"model": "tiny", "input": [10**9]}}, 400, "invalid_request"),
    ("huge integer", "/v1/embeddings", raw('{"model":"tiny","input":[123456789012345678901234567890]}'), 400, "invalid_request"),
    ("bad encoding_format", "/v1/embeddings", {"json": {**GOOD, "encoding_format": "hex"}}, 400, "invalid_request"),
    ("dimensions a string", "/v1/embeddings", {"json": {**GOOD, "dimensions": "8"}}, 400, "invalid_request"),
    ("negative dimensions", "/v1/embeddings", {"json": {**GOOD, "dimensions": -1}}, 400, "invalid_request"),
    ("zero dimensions", "/v1/embeddings", {"json": {**GOOD, "dimensions": 0}}, 400, "invalid_request"),
    ("oversized dimensions", "/v1/embeddings", {"json": {**GOOD, "dimensions": 33}}, 400, "invalid_request"),
    ("truncate not a bool", "/v1/embeddings", {"json": {**GOOD, "truncate": "yes"}}, 400, "invalid_request"),
    ("NaN literal", "/v1/embeddings", raw('{"model":"tiny","input":"x","dimensions":NaN}'), 400, "invalid_json"),
    ("Infinity literal", "/v1/embeddings", raw('{"model":"tiny","input":"x","dimensions":Infinity}'), 400, "invalid_json"),
    ("number overflowing a double", "/v1/embeddings", raw('{"model":"tiny","input":"x","dimensions":1e400}'), 400, "invalid_json"),
    ("lone surrogate escape", "/v1/embeddings", raw('{"model":"tiny","input":"bad \\ud800 text"}'), 400, "invalid_json"),
    ("lone surrogate raw bytes", "/v1/embeddings", {"content": b'{"model":"tiny","input":"\xed\xa0\x80"}', "headers": JSON_CT}, 400, "invalid_json"),
    ("malformed JSON", "/v1/embeddings", raw('{"model": "tiny", "input": '), 400, "invalid_json"),
    ("body not an object", "/v1/embeddings", raw('["tiny", "x"]'), 400, "invalid_request"),
    ("empty body", "/v1/embeddings", raw(""), 400, "invalid_json"),
    ("non-JSON content type", "/v1/embeddings", {"content": json.dumps(GOOD), "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
    ("no content type", "/v1/embeddings", {"content": json.dumps(GOOD)}, 415, "unsupported_media_type"),
    ("form content type", "/v1/embeddings", {"data": {"model": "tiny"}}, 415, "unsupported_media_type"),
    ("body over the limit", "/v1/embeddings", {"json": {"model": "tiny", "input": "x" * (MAX_BODY + 10)}}, 413, "payload_too_large"),
    ("too many inputs", "/v1/embeddings", {"json": {"model": "tiny", "input": ["x"] * (MAX_INPUTS + 1)}}, 400, "too_many_inputs"),
    ("input over the token limit", "/v1/embeddings", {"json": {"model": "tiny", "input": "word " * 200}}, 400, "input_too_long"),
    ("token array over the limit", "/v1/embeddings", {"json": {"model": "tiny", "input": [1000] * 200}}, 400, "input_too_long"),
    ("classify on an embedder", "/v1/classify", {"json": {"model": "tiny", "input": "x"}}, 400, "task_not_supported"),
    ("embed on a classifier", "/v1/embeddings", {"json": {"model": "topics", "input": "x"}}, 400, "task_not_supported"),
    ("classify token ids", "/v1/classify", {"json": {"model": "topics", "input": [1, 2]}}, 400, "invalid_request"),
    ("classify too long", "/v1/classify", {"json": {"model": "topics", "input": "word " * 200}}, 400, "input_too_long"),
    ("classify lone surrogate", "/v1/classify", raw('{"model":"topics","input":"\\udfff"}'), 400, "invalid_json"),
]


@pytest.mark.parametrize("name, route, kwargs, status, code", CASES, ids=[c[0] for c in CASES])
def test_bad_input_answers_its_4xx_and_the_next_request_succeeds(client, name, route, kwargs, status, code):
    r = client.post(route, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "request_id"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    assert r.headers["x-request-id"] == body["request_id"]
    after = client.post("/v1/embeddings", json=GOOD)
    assert after.status_code == 200 and len(after.json()["data"][0]["embedding"]) == 32


def test_oversized_body_is_refused_from_its_declared_length(client):
    """A client that declares a huge body gets 413 without the server reading it."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(str(client.base_url))
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n{\"model\":"
        )
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413"), head
    assert client.post("/v1/embeddings", json=GOOD).status_code == 200


@pytest.mark.parametrize(
    "method, path, status, code",
    [("GET", "/v1/embeddings", 405, "method_not_allowed"), ("GET", "/v1/nothing", 404, "route_not_found")],
)
def test_unknown_routes_and_methods_use_the_envelope(client, method, path, status, code):
    r = client.request(method, path)
    assert r.status_code == status
    assert r.json()["error"]["code"] == code
