"""Every metric of the service, defined once.

Exported through Ray's metrics (``ray.serve.metrics`` adds the deployment, replica and
application tags) and scraped from Ray's metrics export port; Ray prefixes custom metric names
with ``ray_``, so ``loraserve_requests_total`` is scraped as ``ray_loraserve_requests_total``.
Label values are bounded: the ``model`` label is a catalog id (or ``unknown``), never the raw
request string.

Latency is split as TEI splits it: queue (waiting for a batch slot) and inference (the forward
pass of the batch the request rode in).
"""

from __future__ import annotations

from typing import Protocol

LATENCY_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH_ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
UNKNOWN_MODEL = "unknown"


class BatchObserver(Protocol):
    """What the batcher reports; ``ServiceMetrics`` implements it, unit tests may record it."""

    def batch_done(self, rows: int, tokens: int, inference_ms: float) -> None: ...

    def queued(self, wait_ms: float) -> None: ...


class ServiceMetrics:
    """Request-level metrics (recorded by the Router)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter(
            "loraserve_requests_total",
            description="HTTP requests by route, model and status code.",
            tag_keys=("route", "model", "status"),
        )
        self.errors = Counter(
            "loraserve_request_errors_total",
            description="Failed requests by stable error code (the one failure counter).",
            tag_keys=("route", "code"),
        )
        self.latency = Histogram(
            "loraserve_request_latency_ms",
            description="End-to-end latency inside the ingress replica, in milliseconds.",
            boundaries=LATENCY_MS,
            tag_keys=("route", "model"),
        )

    def request(self, route: str, model: str, status: int, latency_ms: float, code: str | None):
        self.requests.inc(tags={"route": route, "model": model, "status": str(status)})
        self.latency.observe(latency_ms, tags={"route": route, "model": model})
        if code is not None:
            self.errors.inc(tags={"route": route, "code": code})


class ModelMetrics:
    """Per (model, variant) batcher metrics (recorded where the backend runs)."""

    def __init__(self, model: str, variant: str) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.tags = {"model": model, "variant": variant}
        keys = ("model", "variant")
        self.queue = Histogram(
            "loraserve_queue_latency_ms",
            description="Time a request's rows waited before their batch started, in ms.",
            boundaries=LATENCY_MS,
            tag_keys=keys,
        )
        self.inference = Histogram(
            "loraserve_inference_latency_ms",
            description="Forward-pass time of each batch, in milliseconds.",
            boundaries=LATENCY_MS,
            tag_keys=keys,
        )
        self.batch_size = Histogram(
            "loraserve_batch_size_rows",
            description="Rows per forward pass (dynamic batching at work).",
            boundaries=BATCH_ROWS,
            tag_keys=keys,
        )
        self.tokens = Counter(
            "loraserve_input_tokens_total",
            description="Input tokens processed (including special tokens).",
            tag_keys=keys,
        )

    def batch_done(self, rows: int, tokens: int, inference_ms: float) -> None:
        self.batch_size.observe(rows, tags=self.tags)
        self.inference.observe(inference_ms, tags=self.tags)
        self.tokens.inc(tokens, tags=self.tags)

    def queued(self, wait_ms: float) -> None:
        self.queue.observe(wait_ms, tags=self.tags)
