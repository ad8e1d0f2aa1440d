"""Every metric of the service, defined once.

Exported through Ray's metrics (``ray.serve.metrics`` adds the deployment, replica and
application tags) and scraped from Ray's metrics export port; Ray prefixes custom metric names
with ``ray_``, so ``loraserve_requests_total`` is scraped as ``ray_loraserve_requests_total``.
Label values are bounded: the ``model`` label is a catalog id (or ``unknown``), never the raw
request string.

Latency is split as TEI splits it: queue (waiting for a batch slot) and inference (the forward
pass of the batch the request rode in).

Adapters: request metrics carry an ``adapter`` label (``none`` for the bare base) bounded by
``AdapterLabels``: at most ``top_n`` adapters get their own label, the rest fold into ``other``.
Adapter loads (by result), load latency, evictions and resident adapters are per replica.
"""

from __future__ import annotations

import collections
import time

# Prometheus' base unit for time is the second (promtool's lint refuses `_ms`); callers pass
# milliseconds, the histograms observe seconds.
LATENCY_S = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30]
BATCH_ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
UNKNOWN_MODEL = "unknown"
NO_ADAPTER = "none"
OTHER_ADAPTERS = "other"


class AdapterLabels:
    """Bounded label values for adapter names: the top-N adapters by recent requests.

    Counts decay by half every ``window_s``; every window the labelled set is re-ranked (at most
    ``top_n`` members; pinned names always included while they fit). A name that leaves the set
    folds into ``other`` from then on. Over the process' life at most ``4 * top_n`` distinct
    values are ever emitted (after that the set only shrinks), so Prometheus series stay bounded.
    """

    def __init__(self, top_n: int, window_s: float = 60.0, pinned: tuple[str, ...] = (), clock=time.monotonic):
        self.top_n = top_n
        self.window_s = window_s
        self.clock = clock
        self.counts: collections.Counter[str] = collections.Counter()
        self.pinned = tuple(pinned)[:top_n]
        self.labelled: set[str] = set(self.pinned)
        self.ever: set[str] = set(self.labelled)
        self._next = clock() + window_s

    def __call__(self, adapter: str | None) -> str:
        if adapter is None:
            return NO_ADAPTER
        self.counts[adapter] += 1
        now = self.clock()
        if now >= self._next:
            self._rerank(now)
        elif adapter not in self.labelled and len(self.labelled) < self.top_n:
            self._admit(adapter)
        return adapter if adapter in self.labelled else OTHER_ADAPTERS

    def _admit(self, name: str) -> bool:
        if name in self.ever or len(self.ever) < 4 * self.top_n:
            self.labelled.add(name)
            self.ever.add(name)
            return True
        return False

    def _rerank(self, now: float) -> None:
        self._next = now + self.window_s
        ranked = [n for n, _ in self.counts.most_common()]
        self.labelled = set(self.pinned)
        for name in ranked:
            if len(self.labelled) >= self.top_n:
                break
            self._admit(name)
        self.counts = collections.Counter({n: c // 2 for n, c in self.counts.items() if c > 1})


class ServiceMetrics:
    """Request-level metrics (recorded by the Router)."""

    def __init__(self, adapter_labels: AdapterLabels | None = None) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.adapter_label = adapter_labels or AdapterLabels(20)
        self.requests = Counter(
            "loraserve_requests_total",
            description="HTTP requests by route, model (base id), adapter and status code.",
            tag_keys=("route", "model", "adapter", "status"),
        )
        self.admin_calls = Counter(
            "loraserve_admin_calls_total",
            description="Adapter admin calls by action (load, unload, list) and result code.",
            tag_keys=("action", "result"),
        )
        self.errors = Counter(
            "loraserve_request_errors_total",
            description="Failed requests by stable error code (the one failure counter).",
            tag_keys=("route", "code"),
        )
        self.latency = Histogram(
            "loraserve_request_latency_seconds",
            description="End-to-end latency inside the ingress replica, in seconds.",
            boundaries=LATENCY_S,
            tag_keys=("route", "model", "adapter"),
        )

    def admin(self, action: str, code: str | None) -> None:
        self.admin_calls.inc(tags={"action": action, "result": code or "ok"})

    def request(
        self, route: str, model: str, status: int, latency_ms: float, code: str | None,
        adapter: str | None = None,
    ):
        label = self.adapter_label(adapter)
        self.requests.inc(tags={"route": route, "model": model, "adapter": label, "status": str(status)})
        self.latency.observe(latency_ms / 1000, tags={"route": route, "model": model, "adapter": label})
        if code is not None:
            self.errors.inc(tags={"route": route, "code": code})


class ModelMetrics:
    """Per (model, variant) metrics, recorded where the backend runs: batches, queue waits,
    adapter loads and residency, variant state (``serve.server.protocol.Observer``)."""

    def __init__(self, model: str, variant: str) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.tags = {"model": model, "variant": variant}
        keys = ("model", "variant")
        self.queue = Histogram(
            "loraserve_queue_latency_seconds",
            description="Time a request's rows waited before their batch started, in seconds.",
            boundaries=LATENCY_S,
            tag_keys=keys,
        )
        self.inference = Histogram(
            "loraserve_inference_latency_seconds",
            description="Forward-pass time of each batch, in seconds.",
            boundaries=LATENCY_S,
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

        self.adapter_loads = Counter(
            "loraserve_adapter_loads_total",
            description="Adapter loads into this replica by result (ok, error).",
            tag_keys=keys + ("result",),
        )
        self.adapter_load_latency = Histogram(
            "loraserve_adapter_load_latency_seconds",
            description="Time to make an adapter resident (validation + add), in seconds.",
            boundaries=LATENCY_S,
            tag_keys=keys,
        )
        self.adapter_evictions = Counter(
            "loraserve_adapter_evictions_total",
            description="Adapters evicted from this replica's LRU to make room.",
            tag_keys=keys,
        )
        self.adapters_resident_gauge = Gauge(
            "loraserve_adapters_resident",
            description="Adapters resident in this replica (Ray adds the replica tag).",
            tag_keys=keys,
        )

        self.variant_serving_gauge = Gauge(
            "loraserve_variant_serving",
            description="1 while this variant serves in this replica, 0 when its files failed "
            "to open or it failed the parity gate.",
            tag_keys=keys,
        )
        self.variant_reloads = Counter(
            "loraserve_variant_reloads_total",
            description="Replaced variant files tried by this replica, by result "
            "(replaced, rejected).",
            tag_keys=keys + ("result",),
        )

    def variant_serving(self, serving: bool) -> None:
        self.variant_serving_gauge.set(1 if serving else 0, tags=self.tags)

    def variant_reload(self, result: str) -> None:
        self.variant_reloads.inc(tags={**self.tags, "result": result})

    def adapter_load(self, result: str, latency_ms: float) -> None:
        self.adapter_loads.inc(tags={**self.tags, "result": result})
        if result == "ok":
            self.adapter_load_latency.observe(latency_ms / 1000, tags=self.tags)

    def adapter_evicted(self) -> None:
        self.adapter_evictions.inc(tags=self.tags)

    def adapters_resident(self, count: int) -> None:
        self.adapters_resident_gauge.set(count, tags=self.tags)

    def batch_done(self, rows: int, tokens: int, inference_ms: float) -> None:
        self.batch_size.observe(rows, tags=self.tags)
        self.inference.observe(inference_ms / 1000, tags=self.tags)
        self.tokens.inc(tokens, tags=self.tags)

    def queued(self, wait_ms: float) -> None:
        self.queue.observe(wait_ms / 1000, tags=self.tags)


class GenerationMetrics(ModelMetrics):
    """A generative base's metrics on top of ``ModelMetrics``, with vLLM's meanings under our
    prefix: time to first token, time per output token (per request: the time after its first
    token over the tokens after it), prompt and generation tokens, running and waiting
    sequences, finished sequences by reason (stop, length, abort) and KV cache use."""

    def __init__(self, model: str, variant: str) -> None:
        super().__init__(model, variant)
        from ray.serve.metrics import Counter, Gauge, Histogram

        keys = ("model", "variant")
        self.ttft = Histogram(
            "loraserve_time_to_first_token_seconds",
            description="From admission to a request's first generated token, in seconds.",
            boundaries=LATENCY_S, tag_keys=keys,
        )
        self.tpot = Histogram(
            "loraserve_time_per_output_token_seconds",
            description="Per request: time after the first token divided by the tokens after it.",
            boundaries=LATENCY_S, tag_keys=keys,
        )
        self.prompt_tokens = Counter(
            "loraserve_prompt_tokens_total", description="Prompt tokens of ended requests (those taken from "
            "the prefix cache included).", tag_keys=keys,
        )
        self.prefix_hits = Counter(
            "loraserve_prefix_cache_hits_total",
            description="Prompt tokens whose KV came from the prefix cache instead of a prefill pass "
            "(over prompt_tokens_total: the hit rate).", tag_keys=keys,
        )
        self.generation_tokens = Counter(
            "loraserve_generation_tokens_total", description="Tokens generated.", tag_keys=keys,
        )
        self.finished = Counter(
            "loraserve_sequences_finished_total",
            description="Sequences ended, by reason: stop (end of text or a stop string), length "
            "(max_tokens or the context), abort (cancelled: the client went away or timed out).",
            tag_keys=keys + ("finished_reason",),
        )
        self.running = Gauge(
            "loraserve_num_sequences_running", description="Sequences decoding in this replica.", tag_keys=keys,
        )
        self.waiting = Gauge(
            "loraserve_num_sequences_waiting", description="Sequences waiting for a slot.", tag_keys=keys,
        )
        self.kv_usage = Gauge(
            "loraserve_kv_cache_usage_ratio",
            description="Share of the KV cache's positions holding tokens (0..1).", tag_keys=keys,
        )
        self.step = Histogram(
            "loraserve_decode_step_seconds", description="Time of one engine step (decode + prefill).",
            boundaries=LATENCY_S, tag_keys=keys,
        )
        self._last_gauges = 0.0

    def decode_step(self, running: int, waiting: int, kv_usage: float, step_ms: float) -> None:
        self.step.observe(step_ms / 1000, tags=self.tags)
        now = time.monotonic()
        if now - self._last_gauges >= 0.5 or running == 0:  # gauges: twice a second is plenty
            self._last_gauges = now
            self.running.set(running, tags=self.tags)
            self.waiting.set(waiting, tags=self.tags)
            self.kv_usage.set(kv_usage, tags=self.tags)

    def generation_done(self, prompt_tokens: int, tokens: int, ttft_s: float | None, tpot_s: float | None,
                        reasons: list[str], cached_tokens: int = 0) -> None:
        self.prompt_tokens.inc(prompt_tokens, tags=self.tags)
        if cached_tokens:
            self.prefix_hits.inc(cached_tokens, tags=self.tags)
        if tokens:
            self.generation_tokens.inc(tokens, tags=self.tags)
        if ttft_s is not None:
            self.ttft.observe(ttft_s, tags=self.tags)
        if tpot_s is not None:
            self.tpot.observe(tpot_s, tags=self.tags)
        for reason in reasons:
            self.finished.inc(tags={**self.tags, "finished_reason": reason})
