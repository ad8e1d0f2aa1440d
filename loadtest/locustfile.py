"""Locust users for loraserve: the traffic a fine-tuning shop sends, with answers checked.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000              # web UI on :8089
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 32 -r 8 -t 60s
    .venv/bin/python -m loadtest.locust_run --host http://127.0.0.1:8000      # + CSV, report, plots

User classes (pick with ``LORASERVE_USERS``, as ``name:weight`` pairs; default
``embed:1,classify:3``; Locust's own class picker in the web UI works too):

- ``embed`` (EmbeddingsUser): embeddings on the base model.
- ``classify`` (AdapterUser): classification over the served adapters, drawn by Zipf popularity
  (a few adapters get most requests, a long tail a little): the head stays resident, the tail
  loads and evicts, as real adapter traffic does.
- ``cold`` (ColdAdapterUser): only the least popular half of the adapters, uniformly: the
  adapter cache's worst case.
- ``variant`` (VariantUser): embeddings on the base model's ONNX variants (``@onnx``,
  ``@onnx-int8``) in turn.
- ``admin`` (AdminChurnUser): loads a copy of an adapter under its own name, uses it, unloads
  it, again and again (needs the admin key when admin keys are set).
- ``chat`` (ChatStreamUser): streamed chat completions from the generative base and, half of
  the time, its adapters by Zipf popularity; each stream is checked (role, text, one finish
  reason, usage, ``[DONE]``) and its time to first token is a stats entry of its own
  (``chat:ttft``). ``LORASERVE_GEN_MODEL`` (default ``storyteller``), ``LORASERVE_GEN_ADAPTERS``
  (default: every adapter on that base), ``LORASERVE_GEN_MAX_TOKENS`` (default 64).

Settings (environment variables):

- ``LORASERVE_ADAPTERS``: adapter names, most popular first. Default: every classify adapter in
  ``GET /v1/models`` (order as listed). ``LORASERVE_ZIPF_S``: the Zipf exponent (default 1.1).
- ``LORASERVE_BASE_MODEL``: the base model (default ``minilm``); ``LORASERVE_VARIANTS``: the
  variants VariantUser calls (default ``onnx,onnx-int8``).
- ``LORASERVE_API_KEY`` / ``LORASERVE_ADMIN_KEY``: bearer tokens for inference / admin calls.
- ``LORASERVE_CHURN_PATH``: the adapter directory AdminChurnUser loads (default ``sentiment``).
- ``LORASERVE_ADAPTER_ROWS``: the most popular adapters that get a stats row of their own
  (``classify:<name>``); the others share ``classify:other`` (default 5; rows stay bounded).
- ``LORASERVE_STAGES``: a load shape, ``seconds:users`` pairs in order (``30:4,60:16,60:4``
  holds 4 users for 30 s, 16 for 60 s, 4 for 60 s, then stops). Unset: ``-u``/``-r``/``-t``.
- SLO, checked when the run ends (the verdict is printed; a miss exits 1):
  ``LORASERVE_SLO_FAIL_RATIO`` (default 0), ``LORASERVE_SLO_P95_MS`` (every route, default
  2000), ``LORASERVE_SLO_P95_MS_ROUTES`` (per route: ``embeddings=300,classify:other=800``).
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import random
import time

from locust import HttpUser, LoadTestShape, between, events, task

try:
    from loadtest.zipf import zipf_weights
except ImportError:  # started from outside the repository: locust puts this file's folder on sys.path
    from zipf import zipf_weights

SENTENCES = [
    "The new phone has a wonderful screen and the battery lasts for days.",
    "Shares fell sharply after the quarterly earnings report.",
    "The striker scored twice in the final minutes of the match.",
    "Astronomers found water vapour on a distant planet.",
    "The service was slow and the food arrived cold.",
    "A short sentence.",
]
BASE = os.environ.get("LORASERVE_BASE_MODEL", "minilm")
ROWS = int(os.environ.get("LORASERVE_ADAPTER_ROWS", "5"))


def _pairs(raw: str) -> list[tuple[str, str]]:
    return [tuple(p.strip().split(":" if ":" in p else "=", 1)) for p in raw.split(",") if p.strip()]


WEIGHTS = {name: int(w) for name, w in _pairs(os.environ.get("LORASERVE_USERS", "embed:1,classify:3"))}


class Popularity:
    """Adapter names drawn by Zipf popularity (the first name is rank 1, the most popular)."""

    def __init__(self, names: list[str], s: float, rng: random.Random):
        self.names = names
        self.cum = list(itertools.accumulate(zipf_weights(len(names), s))) if names else []
        self.rng = rng

    def pick(self) -> str:
        x = self.rng.random() * self.cum[-1]
        return self.names[bisect.bisect_left(self.cum, x)]


_adapters: list[str] | None = None


def adapters(client) -> list[str]:
    global _adapters
    if _adapters is None:
        given = os.environ.get("LORASERVE_ADAPTERS")
        if given:
            _adapters = [a.strip() for a in given.split(",") if a.strip()]
        else:
            models = client.get("/v1/models", name="/v1/models").json()["data"]
            _adapters = [m["id"] for m in models if m.get("parent") and m.get("task") == "classify"]
    return _adapters


def row_name(adapter: str, names: list[str]) -> str:
    """A stats row per popular adapter, one shared row for the rest (bounded)."""
    return f"classify:{adapter}" if adapter in names[:ROWS] else "classify:other"


class _User(HttpUser):
    abstract = True
    wait_time = between(0, 0)  # closed loop: the next request as soon as the answer arrives

    def on_start(self) -> None:
        key = os.environ.get("LORASERVE_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        self.rng = random.Random()

    def embed(self, model: str, name: str) -> None:
        body = {"model": model, "input": self.rng.choice(SENTENCES)}
        with self.client.post("/v1/embeddings", json=body, name=name, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif len(r.json()["data"]) != 1:
                r.failure("wrong number of embeddings")

    def classify(self, model: str, name: str) -> None:
        body = {"model": model, "input": self.rng.choice(SENTENCES)}
        with self.client.post("/v1/classify", json=body, name=name, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{model}: {r.status_code}: {r.text[:200]}")
            else:
                row = r.json()["data"][0]
                if abs(sum(row["probs"]) - 1) > 1e-3 or row["label"] is None:
                    r.failure(f"{model}: malformed answer")


class EmbeddingsUser(_User):
    weight = WEIGHTS.get("embed", 0)

    @task
    def embeddings(self) -> None:
        self.embed(BASE, "embeddings")


class AdapterUser(_User):
    weight = WEIGHTS.get("classify", 0)

    def on_start(self) -> None:
        super().on_start()
        self.popular = Popularity(adapters(self.client), float(os.environ.get("LORASERVE_ZIPF_S", "1.1")), self.rng)

    @task
    def zipf(self) -> None:
        if not self.popular.names:
            return self.embed(BASE, "embeddings")
        model = self.popular.pick()
        self.classify(model, row_name(model, self.popular.names))


class ColdAdapterUser(_User):
    weight = WEIGHTS.get("cold", 0)

    def on_start(self) -> None:
        super().on_start()
        names = adapters(self.client)
        self.tail = names[len(names) // 2:] or names

    @task
    def cold(self) -> None:
        self.classify(self.rng.choice(self.tail), "classify:cold tail")


class VariantUser(_User):
    weight = WEIGHTS.get("variant", 0)
    variants = [v.strip() for v in os.environ.get("LORASERVE_VARIANTS", "onnx,onnx-int8").split(",") if v.strip()]

    @task
    def variant(self) -> None:
        v = self.rng.choice(self.variants)
        self.embed(f"{BASE}@{v}", f"embeddings@{v}")


class AdminChurnUser(_User):
    weight = WEIGHTS.get("admin", 0)

    def on_start(self) -> None:
        super().on_start()
        key = os.environ.get("LORASERVE_ADMIN_KEY")
        self.admin = {"Authorization": f"Bearer {key}"} if key else {}
        # one name per user, reused: adapter names stay bounded (metric labels, registry)
        self.name = f"churn-{self.rng.randrange(16**6):06x}"

    @task
    def churn(self) -> None:
        name = self.name
        body = {"lora_name": name, "lora_path": os.environ.get("LORASERVE_CHURN_PATH", "sentiment"),
                "base_model_name": BASE}
        with self.client.post("/v1/load_lora_adapter", json=body, headers=self.admin, name="admin load",
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
                return
        self.classify(name, "classify:churned")
        with self.client.post("/v1/unload_lora_adapter", json={"lora_name": name}, headers=self.admin,
                              name="admin unload", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")


if os.environ.get("LORASERVE_STAGES"):
    class StagesShape(LoadTestShape):
        """``LORASERVE_STAGES``: hold each user count for its seconds, then stop."""

        stages = [(int(s), int(u)) for s, u in _pairs(os.environ["LORASERVE_STAGES"])]

        def tick(self):
            t, end = self.get_run_time(), 0
            for seconds, users in self.stages:
                end += seconds
                if t < end:
                    return users, max(users, 1)  # spawn the step at once
            return None


def slo_verdict(stats) -> tuple[bool, list[str]]:
    """(passed, lines): the failure ratio and every route's p95 against its threshold."""
    max_fail = float(os.environ.get("LORASERVE_SLO_FAIL_RATIO", "0"))
    default_p95 = float(os.environ.get("LORASERVE_SLO_P95_MS", "2000"))
    per_route = _route_limits()
    lines, ok = [], True
    total = stats.total
    fail_ok = total.fail_ratio <= max_fail
    ok &= fail_ok
    lines.append(f"{'PASS' if fail_ok else 'FAIL'} failure ratio {total.fail_ratio:.2%} "
                 f"(limit {max_fail:.2%}, {total.num_failures} of {total.num_requests})")
    for (name, _method), entry in sorted(stats.entries.items()):
        if not entry.num_requests:
            continue
        p95 = entry.get_response_time_percentile(0.95) or 0
        limit = per_route.get(name, default_p95)
        good = p95 <= limit
        ok &= good
        lines.append(f"{'PASS' if good else 'FAIL'} p95 {name}: {p95:.0f} ms (limit {limit:.0f} ms)")
    return ok, lines


def _route_limits() -> dict[str, float]:
    """``LORASERVE_SLO_P95_MS_ROUTES``: ``route=ms`` pairs (route names may contain ``:``)."""
    out = {}
    for part in os.environ.get("LORASERVE_SLO_P95_MS_ROUTES", "").split(","):
        if "=" in part:
            route, ms = part.rsplit("=", 1)
            out[route.strip()] = float(ms)
    return out


@events.quitting.add_listener
def _slo(environment, **_kw) -> None:
    """Print the SLO verdict; a miss makes the run exit 1."""
    ok, lines = slo_verdict(environment.stats)
    print("SLO " + ("met" if ok else "MISSED") + ":\n  " + "\n  ".join(lines), flush=True)
    if not ok:
        environment.process_exit_code = 1


GEN_BASE = os.environ.get("LORASERVE_GEN_MODEL", "storyteller")
CHAT_ASKS = [
    "Write a short story about a fox named Leo.",
    "Write a short story about a duck named Mia.",
    "Where does Tom the dog like to play?",
    "Tell me about the kite.",
]
_gen_adapters: list[str] | None = None


def generation_adapters(client) -> list[str]:
    """``LORASERVE_GEN_ADAPTERS`` (most popular first), else every adapter on the generative base."""
    global _gen_adapters
    if _gen_adapters is None:
        given = os.environ.get("LORASERVE_GEN_ADAPTERS")
        if given is not None:
            _gen_adapters = [a.strip() for a in given.split(",") if a.strip()]
        else:
            models = client.get("/v1/models", name="/v1/models").json()["data"]
            _gen_adapters = [m["id"] for m in models if m.get("parent") == GEN_BASE]
    return _gen_adapters


class ChatStreamUser(_User):
    """Streams chat completions (the base, and its adapters by Zipf popularity) and checks the
    stream: a role first, text, one finish reason, usage, ``[DONE]`` last. Time to first token
    is its own stats entry (``chat:ttft``), next to the whole stream (``chat:stream``)."""

    weight = WEIGHTS.get("chat", 0)

    def on_start(self) -> None:
        super().on_start()
        names = generation_adapters(self.client)
        self.popular = Popularity(names, float(os.environ.get("LORASERVE_ZIPF_S", "1.1")), self.rng)
        self.max_tokens = int(os.environ.get("LORASERVE_GEN_MAX_TOKENS", "64"))

    @task
    def chat(self) -> None:
        model = self.popular.pick() if self.popular.names and self.rng.random() < 0.5 else GEN_BASE
        body = {"model": model, "messages": [{"role": "user", "content": self.rng.choice(CHAT_ASKS)}],
                "max_tokens": self.max_tokens, "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        first = None
        with self.client.post("/v1/chat/completions", json=body, name="chat:stream", stream=True,
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{model}: {r.status_code}: {r.text[:200]}")
                return
            chunks, reasons, usage = [], [], None
            for line in r.iter_lines():
                if not line or not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    chunks.append(None)
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    r.failure(f"{model}: {chunk['error'].get('code')}")
                    return
                for c in chunk.get("choices", []):
                    if first is None and c["delta"].get("content"):
                        first = time.perf_counter()
                    if c.get("finish_reason"):
                        reasons.append(c["finish_reason"])
                usage = chunk.get("usage") or usage
                chunks.append(chunk)
            if not chunks or chunks[-1] is not None:
                r.failure(f"{model}: the stream did not end with [DONE]")
            elif len(reasons) != 1 or usage is None:
                r.failure(f"{model}: malformed stream ({len(reasons)} finish reasons, usage {usage})")
            # a sampled end-of-text as the first token is a valid, empty answer: no TTFT entry then
            # Locust times a streamed response to its headers; this entry is the whole stream
            r.request_meta["response_time"] = (time.perf_counter() - start) * 1000
        if first is not None:
            self.environment.events.request.fire(request_type="SSE", name="chat:ttft", response_time=(first - start) * 1000,
                                 response_length=0, exception=None, context={})
