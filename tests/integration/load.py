"""A bounded load loop for fault tests: ``CLIENTS`` threads, every outcome counted."""

import threading
import time
from collections import Counter

import httpx

CLIENTS = 4


class Load:
    """``CLIENTS`` threads in a closed loop of one-sentence embeddings; every outcome counted."""

    def __init__(self, base_url: str, timeout_s: float = 20.0, model: str = "tiny"):
        self.model = model
        self.base_url, self.timeout_s = base_url, timeout_s
        self.outcomes: Counter = Counter()
        self.failures: list[tuple[float, str]] = []  # (wall-clock time, what)
        self.slowest = 0.0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(CLIENTS)]

    def _loop(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=self.timeout_s) as c:
            while not self.stop.is_set():
                t, wall = time.monotonic(), time.time()
                try:
                    r = c.post("/v1/embeddings", json={"model": self.model, "input": "fault"})
                    kind = str(r.status_code)
                    if r.status_code != 200:
                        envelope = r.headers.get("content-type", "").startswith("application/json") \
                            and "error" in r.json()
                        self.failures.append((wall, f"{r.status_code} {'envelope' if envelope else r.text[:60]!r}"))
                except httpx.HTTPError as exc:
                    kind = type(exc).__name__
                    self.failures.append((wall, f"{kind}: {str(exc)[:60]}"))
                self.outcomes[kind] += 1
                self.slowest = max(self.slowest, time.monotonic() - t)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(self.timeout_s + 5)
