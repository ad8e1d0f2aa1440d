"""Many adapters for a benchmark: a seeded synthetic store, the admin API, hot loads, memory.

``make_store`` writes copies of a template adapter (the shipped ``adapters/sentiment``) whose
tensors are seeded normal noise of the same shapes: LoRA A and B ~ N(0, 0.02), the classifier
head ~ N(0, 0.1), so every adapter answers differently. ``register`` loads them through
``POST /v1/load_lora_adapter`` (a few calls in parallel); ``hot_loads`` times, for fresh
adapters, the admin call and the first ``/v1/classify`` of each; ``memory_child`` (run in a
spawned process, no Ray) measures the RSS a backend grows by per resident adapter.
"""

from __future__ import annotations

import http.client
import json
import shutil
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loadtest.report import REPO

TEMPLATE = REPO / "adapters" / "sentiment"
WEIGHTS = "adapter_model.safetensors"
COPIED = ("adapter_config.json", "loraserve_card.json")
LORA_STD, HEAD_STD = 0.02, 0.1
SENTENCE = "The quick brown fox jumps over the lazy dog."


def names(prefix: str, n: int, start: int = 1) -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(start, start + n)]


def make_store(root: Path, adapter_names: list[str], seed: int = 1234) -> dict:
    """One directory per name under ``root`` (existing complete ones are kept)."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(TEMPLATE / WEIGHTS), "np") as f:
        meta = f.metadata()
        shapes = {k: (f.get_tensor(k).shape, f.get_tensor(k).dtype) for k in f.keys()}
    made = 0
    for i, name in enumerate(adapter_names):
        d = root / name
        if (d / WEIGHTS).is_file() and all((d / c).is_file() for c in COPIED):
            continue
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, i, sum(name.encode())])
        tensors = {k: rng.normal(0.0, LORA_STD if ".lora_" in k else HEAD_STD, shape).astype(dtype)
                   for k, (shape, dtype) in shapes.items()}
        save_file(tensors, str(d / WEIGHTS), metadata=meta)
        for c in COPIED:
            shutil.copyfile(TEMPLATE / c, d / c)
        made += 1
    return {"written": made, "adapters": len(adapter_names),
            "file_mib": (root / adapter_names[0] / WEIGHTS).stat().st_size / 2**20}


class Conn:
    """One keep-alive HTTP/1.1 connection for sequential JSON calls."""

    def __init__(self, base_url: str, timeout_s: float = 60.0):
        host, port = base_url.removeprefix("http://").split(":")
        self.host, self.port, self.timeout = host, int(port), timeout_s
        self.c: http.client.HTTPConnection | None = None

    def call(self, method: str, path: str, payload: dict | None = None) -> tuple[int, dict]:
        body = json.dumps(payload).encode() if payload is not None else None
        for attempt in (0, 1):  # one retry on a connection the server closed meanwhile
            if self.c is None:
                self.c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.c.request(method, path, body, {"Content-Type": "application/json"})
                r = self.c.getresponse()
                data = r.read()
                try:
                    parsed = json.loads(data) if data else {}
                except ValueError:
                    parsed = {"text": data[:300].decode(errors="replace")}
                return r.status, parsed
            except (http.client.HTTPException, OSError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.c is not None:
            self.c.close()
            self.c = None


def classify(conn: Conn, name: str) -> tuple[int, dict]:
    return conn.call("POST", "/v1/classify", {"model": name, "input": [SENTENCE]})


def register(base_url: str, store: Path, adapter_names: list[str], base: str, parallel: int = 4) -> dict:
    """Register every adapter not registered yet; seconds, failures and call latencies."""
    st, listed = Conn(base_url).call("GET", "/v1/adapters")
    have = {a["name"] for a in listed.get("data", [])} if st == 200 else set()
    todo = [n for n in adapter_names if n not in have]
    local, failures = threading.local(), []

    def one(name: str) -> float:
        if not hasattr(local, "conn"):
            local.conn = Conn(base_url)
        t0 = time.perf_counter()
        code, resp = local.conn.call("POST", "/v1/load_lora_adapter", {
            "lora_name": name, "lora_path": str(store / name), "base_model_name": base})
        if code != 200:
            failures.append(f"{name}: {code} {str(resp)[:200]}")
        return time.perf_counter() - t0

    t0 = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        times = sorted(pool.map(one, todo))
    return {"registered": len(todo) - len(failures), "already": len(adapter_names) - len(todo),
            "seconds": time.monotonic() - t0, "failed": len(failures), "failures": failures[:5],
            "call_ms_p50": 1000 * statistics.median(times) if times else None}


def hot_loads(base_url: str, store: Path, adapter_names: list[str], base: str, gap_s: float) -> dict:
    """For each fresh adapter: t0 before the admin load, t1 when it returns, t2 when the first
    classify of it (sent right after) answers 200. Per adapter ms: total, admin, first."""
    conn = Conn(base_url)
    total, admin, first, failures = [], [], [], []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for name in adapter_names:
        t0 = time.perf_counter()
        code, resp = conn.call("POST", "/v1/load_lora_adapter", {
            "lora_name": name, "lora_path": str(store / name), "base_model_name": base})
        t1 = time.perf_counter()
        if code != 200:
            failures.append(f"load {name}: {code} {str(resp)[:200]}")
            continue
        code, resp = classify(conn, name)
        t2 = time.perf_counter()
        if code != 200:
            failures.append(f"classify {name}: {code} {str(resp)[:200]}")
            continue
        total.append(1000 * (t2 - t0))
        admin.append(1000 * (t1 - t0))
        first.append(1000 * (t2 - t1))
        time.sleep(gap_s)
    conn.close()
    return {"n": len(adapter_names), "ok": len(total), "failures": failures, "total_ms": total,
            "admin_ms": admin, "first_classify_ms": first,
            "client_cpu_share": (time.process_time() - cpu0) / (time.perf_counter() - wall0)}


def memory_child(config: str, model_id: str, store: str, adapter_names: list[str], capacity: int) -> dict:
    """In a fresh process without Ray: VmRSS of the torch backend before and after adding the
    adapters (``adapters_per_replica: capacity``), and after removing half of them."""
    import gc

    from loadtest.inprocess import model_spec
    from loadtest.service import memory_mb
    from models import base_weight_shapes, create_backend, validate_adapter
    from serve.settings import load_settings

    spec = model_spec(load_settings(config), model_id)
    spec = spec.model_copy(update={"adapters": spec.adapters.model_copy(
        update={"adapters_per_replica": capacity, "max_rank": max(64, spec.adapters.max_rank)})})
    b = create_backend(spec, "torch")
    b.load()
    b.predict(b.encode([SENTENCE] * 8))
    root = Path(store)
    shapes = base_weight_shapes(b.path)
    checks = [validate_adapter(str(root / n), [root], base_shapes=shapes, task="classify",
                               max_rank=spec.adapters.max_rank, base_task=spec.task)
              for n in adapter_names]
    gc.collect()
    rss = {"loaded": memory_mb()}
    add_ms = []
    for name, check in zip(adapter_names, checks):
        t0 = time.perf_counter()
        b.add_adapter(name, check, "classify", check.labels)
        add_ms.append(1000 * (time.perf_counter() - t0))
        if len(add_ms) == 1:
            gc.collect()
            rss["after_1"] = memory_mb()
    gc.collect()
    rss["after_all"] = memory_mb()
    b.predict(b.encode([SENTENCE] * 32), [adapter_names[i % len(adapter_names)] for i in range(32)])
    for name in adapter_names[: len(adapter_names) // 2]:
        b.remove_adapter(name)
    gc.collect()
    rss["after_removing_half"] = memory_mb()
    b.close()
    n = len(adapter_names)
    return {"adapters": n, "capacity": capacity, "rss_mb": rss,
            "mb_per_adapter": (rss["after_all"]["VmRSS"] - rss["loaded"]["VmRSS"]) / n,
            "mb_per_adapter_after_first": (rss["after_all"]["VmRSS"] - rss["after_1"]["VmRSS"]) / max(n - 1, 1),
            "file_mb": checks[0].size_bytes / 1e6 if checks else None,
            "add_ms_p50": statistics.median(add_ms), "add_ms_first": add_ms[0]}
