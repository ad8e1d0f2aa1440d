"""Metrics are exported through Ray's metrics port and show the batching at work."""

import asyncio
import re

import httpx

from tests.integration.conftest import tiny_adapters
from tests.waiting import wait_until


def scrape(service) -> str:
    port = service.metrics_export_port
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def series(text: str, name: str, **labels) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def test_request_batch_token_and_error_metrics(service, client):
    before = scrape(service)  # other tests used the same model: compare against this
    async def burst():
        async with httpx.AsyncClient(base_url=service.base_url, timeout=60) as c:
            return await asyncio.gather(
                *(c.post("/v1/embeddings", json={"model": "tiny", "input": f"metric probe {i}"}) for i in range(24))
            )

    assert all(r.status_code == 200 for r in asyncio.run(burst()))
    assert client.post("/v1/embeddings", json={"model": "nope", "input": "x"}).status_code == 404

    def delta(text, name, **labels):
        return series(text, name, **labels) - series(before, name, **labels)

    def exported():  # Ray exports on an interval: wait for the counts, not a fixed time
        text = scrape(service)
        ok = delta(text, "ray_loraserve_requests_total", route="embeddings", model="tiny", status="200")
        errors = delta(text, "ray_loraserve_request_errors_total", code="model_not_found")
        batches = delta(text, "ray_loraserve_batch_size_rows_count", model="tiny")
        return (text, ok, batches) if ok >= 24 and errors >= 1 and batches >= 1 else None

    text, ok, batches = wait_until(exported, "request, error and batch metrics", every_s=1)
    # Ray exports a histogram's count and buckets exactly (its _sum is approximate): batches
    # of more than 4 rows exist, and fewer forward passes ran than requests were served.
    big = delta(text, "ray_loraserve_batch_size_rows_bucket", model="tiny", le="8.0") - delta(
        text, "ray_loraserve_batch_size_rows_bucket", model="tiny", le="4.0")
    assert big >= 1 and 1 <= batches < ok, (big, batches, ok)
    assert series(text, "ray_loraserve_requests_total", model="unknown", status="404") >= 1
    assert series(text, "ray_loraserve_input_tokens_total", model="tiny", variant="torch") > 24 * 3
    for name in ("ray_loraserve_queue_latency_seconds_count", "ray_loraserve_inference_latency_seconds_count",
                 "ray_loraserve_request_latency_seconds_count"):
        assert series(text, name) > 0, name
    assert re.search(r'ray_loraserve_batch_size_rows_bucket\{[^}]*le="32\.0"', text)


def test_adapter_metrics(service, client, admin):
    """Loads by result, load latency, evictions, residency and the bounded adapter label."""
    with tiny_adapters(admin, "metric") as names:  # more than the tiny base's LRU holds
        for _ in range(2):
            for name in names:
                assert client.post("/v1/classify", json={"model": name, "input": "probe"}).status_code == 200
        def exported():
            text = scrape(service)
            loads = series(text, "ray_loraserve_adapter_loads_total", model="tiny", result="ok")
            evictions = series(text, "ray_loraserve_adapter_evictions_total", model="tiny")
            labelled = series(text, "ray_loraserve_requests_total", route="classify", adapter="metric-0")
            return text if loads >= 8 and evictions >= 1 and labelled >= 2 else None

        text = wait_until(exported, "8 adapter loads, an eviction and the adapter label", every_s=1)
        assert series(text, "ray_loraserve_adapter_load_latency_seconds_count", model="tiny") >= 8
        assert 'ray_loraserve_adapters_resident{' in text
        assert series(text, "ray_loraserve_requests_total", route="embeddings", adapter="none") > 0
        assert series(text, "ray_loraserve_admin_calls_total", action="load", result="ok") >= 4


def test_variant_metrics_show_serving_and_refused_variants(service, client):
    """The refused `strict@onnx` reports 0, serving variants 1, all labelled by variant."""
    assert client.post("/v1/embeddings", json={"model": "minilm@onnx-int8", "input": "x"}).status_code == 200
    def exported():
        text = scrape(service)
        refused = [line for line in text.splitlines()
                   if line.startswith("ray_loraserve_variant_serving{") and 'model="strict"' in line
                   and 'variant="onnx"' in line]
        serving = series(text, "ray_loraserve_variant_serving", model="minilm", variant="onnx-int8")
        passes = series(text, "ray_loraserve_inference_latency_seconds_count", model="minilm", variant="onnx-int8")
        return refused if refused and serving >= 1 and passes >= 1 else None

    refused = wait_until(exported, "variant gauges of a refused and a serving variant", every_s=1)
    assert all(line.endswith(" 0.0") or line.endswith(" 0") for line in refused)
