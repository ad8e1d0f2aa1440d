"""Locust users for loraserve: base-model embeddings plus classification over adapters whose
popularity follows a Zipf law (a few adapters get most traffic, a long tail gets a little), the
traffic shape that decides whether per-replica adapter LRUs hold up.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 32 -r 8 -t 60s

(``make locust`` runs that against a running ``make up``.) Locust is kept for this scenario, not
wrk, because every answer is checked (a wrong answer counts as a failure) and the run ends with
an SLO verdict as its exit code; the benchmarks use wrk, which costs the server far less CPU.

Settings (environment variables):
- ``LORASERVE_ADAPTERS``: comma-separated adapter names, most popular first. Default: every
  adapter in ``GET /v1/models`` whose task is ``classify`` (order as listed).
- ``LORASERVE_ZIPF_S``: the Zipf exponent (default 1.1; 0 = uniform).
- ``LORASERVE_BASE_MODEL``: the embeddings model (default ``minilm``).
- ``LORASERVE_MIX``: weights of ``embed:classify`` tasks (default ``1:3``).
- ``LORASERVE_API_KEY``: sent as a bearer token when set.
- ``LORASERVE_SLO_P99_MS`` / ``LORASERVE_SLO_FAIL_RATIO``: when the run ends, the process exits
  non-zero if the overall p99 or the failure ratio is above these (defaults 2000 ms and 0).

Each request picks one sentence from a fixed list; responses are checked (status and shape),
so a wrong answer counts as a failure, not just an HTTP error.
"""

from __future__ import annotations

import bisect
import itertools
import os
import random

from locust import HttpUser, between, events, task

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


class Popularity:
    """Adapter names drawn by Zipf popularity (the first name is rank 1, the most popular)."""

    def __init__(self, names: list[str], s: float, rng: random.Random):
        self.names = names
        self.cum = list(itertools.accumulate(zipf_weights(len(names), s)))
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


class ServiceUser(HttpUser):
    wait_time = between(0, 0)  # closed loop: the next request as soon as the answer arrives

    def on_start(self) -> None:
        key = os.environ.get("LORASERVE_API_KEY")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        self.rng = random.Random()
        self.popular = Popularity(adapters(self.client), float(os.environ.get("LORASERVE_ZIPF_S", "1.1")), self.rng)
        self.base = os.environ.get("LORASERVE_BASE_MODEL", "minilm")

    @task(int(os.environ.get("LORASERVE_MIX", "1:3").split(":")[0]))
    def embed(self) -> None:
        body = {"model": self.base, "input": self.rng.choice(SENTENCES)}
        with self.client.post("/v1/embeddings", json=body, name="embeddings", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{r.status_code}: {r.text[:200]}")
            elif len(r.json()["data"]) != 1:
                r.failure("wrong number of embeddings")

    @task(int(os.environ.get("LORASERVE_MIX", "1:3").split(":")[1]))
    def classify(self) -> None:
        if not self.popular.names:
            return self.embed()
        model = self.popular.pick()
        body = {"model": model, "input": self.rng.choice(SENTENCES)}
        # one stats row for all adapters: per-adapter rows would be unbounded
        with self.client.post("/v1/classify", json=body, name="classify (zipf adapters)", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"{model}: {r.status_code}: {r.text[:200]}")
            else:
                row = r.json()["data"][0]
                if abs(sum(row["probs"]) - 1) > 1e-3 or row["label"] is None:
                    r.failure(f"{model}: malformed answer")


@events.quitting.add_listener
def _slo(environment, **_kw) -> None:
    """Fail the run (exit code 1) when the service misses the SLO."""
    stats = environment.stats.total
    p99 = stats.get_response_time_percentile(0.99) or 0
    max_p99 = float(os.environ.get("LORASERVE_SLO_P99_MS", "2000"))
    max_fail = float(os.environ.get("LORASERVE_SLO_FAIL_RATIO", "0"))
    if stats.fail_ratio > max_fail or p99 > max_p99:
        print(f"SLO missed: p99 {p99:.0f} ms (limit {max_p99:.0f}), failures "
              f"{stats.fail_ratio:.2%} (limit {max_fail:.2%})")
        environment.process_exit_code = 1
