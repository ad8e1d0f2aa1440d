"""Faults under load, each on its own `loraserve up` (two Router replicas, the tiny model):
a replica killed, a full queue, a wedged replica. Every client request is counted; the counts
are asserted as bounds and printed (``pytest -s`` shows them; docs/operations.md quotes them).
"""

import os
import signal
import threading
import time
from collections import Counter

import httpx
import pytest

from serve.processes import cmdline, descendants, proc_stat
from tests.integration.conftest import service_config, start_up
from tests.integration.load import CLIENTS, Load
from tests.waiting import wait_until

ROUTER = "ray::ServeReplica:loraserve:Router"


def routers(up) -> list[int]:
    """PIDs of this service's Router replicas (its own process tree, not another service's)."""
    return sorted(pid for pid in descendants(up.pid) if cmdline(pid).startswith(ROUTER))


def busiest_router(up) -> int:
    """The Router replica that has used the most CPU: one that is serving. (Not the lowest PID:
    PIDs wrap, and once a replacement replica was seen created but never initialized by Serve,
    so the lowest PID was a replica that served nothing and was never health-checked.)"""
    def cpu(pid: int) -> int:
        f = proc_stat(pid)
        return int(f[11]) + int(f[12]) if f else -1  # utime + stime (fields 14, 15 of /proc/pid/stat)
    return max(routers(up), key=cpu)


@pytest.fixture(scope="module")
def faulty(tiny_models, tmp_path_factory):
    places = tmp_path_factory.mktemp("faults")
    setup = service_config(tiny_models, places / "store", places / "state", band=1)
    setup.keep_models("tiny")
    setup.args["adapters"]["preload"] = []
    tiny = setup.args["models"][0]
    tiny["batching"] = {"max_batch_size": 8, "max_wait_ms": 0, "max_queue_rows": 16}
    tiny["variants"] = ["torch"]  # the faults are the replicas', not a variant's: no ONNX builds
    setup.config["applications"][0]["deployments"] = [
        {"name": "Router", "num_replicas": 2, "health_check_period_s": 1, "health_check_timeout_s": 4,
         "graceful_shutdown_timeout_s": 2}]
    proc, log, base_url = start_up(setup, places)
    wait_until(lambda: len(routers(proc)) == 2, "two Router replicas", timeout_s=60)
    yield proc, base_url
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=90)


def ok_after(base_url: str, since: float) -> float:
    """Seconds from ``since`` until 10 requests in a row succeed."""
    def ten_ok():
        with httpx.Client(base_url=base_url, timeout=10) as c:
            return all(c.post("/v1/embeddings", json={"model": "tiny", "input": "x"}).status_code == 200
                       for _ in range(10))
    wait_until(ten_ok, "ten good answers in a row", timeout_s=60, every_s=0.5)
    return time.monotonic() - since


def test_replica_killed_under_load(faulty):
    proc, base_url = faulty
    victim = routers(proc)[0]
    with Load(base_url) as load:
        time.sleep(3)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        time.sleep(12)
    back_s = ok_after(base_url, killed_at)
    replaced = wait_until(lambda: len([p for p in routers(proc) if p != victim]) == 2 or None,
                          "a replacement replica", timeout_s=60)
    print(f"\nreplica killed: {dict(load.outcomes)}; failures {load.failures}; full service after "
          f"{back_s:.1f} s; slowest request {load.slowest:.1f} s")
    assert load.outcomes["200"] > 0 and replaced
    assert len(load.failures) <= 2 * CLIENTS, load.failures  # what was in flight on the victim, and its socket
    # each a 5xx in the envelope: HAProxy retries an empty response once on the other replica
    # (deploy/ray.env), so none is a connection closed without an answer
    assert all(f[1].endswith("envelope") and f[1][:1] == "5" for f in load.failures), load.failures
    assert load.slowest < load.timeout_s  # none hanging
    assert back_s < 30


def test_full_queue_answers_503_with_retry_after_at_once(faulty):
    _, base_url = faulty
    results: list = []
    start = threading.Barrier(24)

    def burst():
        with httpx.Client(base_url=base_url, timeout=30) as c:
            start.wait(10)  # all at once: 24 x 12 rows against 16-row queues on 2 replicas
            t = time.monotonic()
            r = c.post("/v1/embeddings", json={"model": "tiny", "input": ["a sentence to embed, a few words long"] * 12})
            results.append((r.status_code, r.headers.get("retry-after"), time.monotonic() - t,
                            r.json().get("error", {}).get("code") if r.status_code != 200 else None))

    threads = [threading.Thread(target=burst) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    refused = [r for r in results if r[0] == 503]
    print(f"\nfull queue: {Counter(r[0] for r in results)}; slowest 503 {max((r[2] for r in refused), default=0):.2f} s")
    assert len(results) == 24 and {r[0] for r in results} <= {200, 503}
    assert refused, "24 x 12 rows at once against 16-row queues on 2 replicas must overflow"
    assert all(r[1] == "1" and r[3] == "overloaded" for r in refused), refused
    assert max(r[2] for r in refused) < 2.0  # at once, not after a timeout
    ok_after(base_url, time.monotonic())  # the next requests are served


def test_wedged_replica_is_replaced(faulty):
    proc, base_url = faulty
    with Load(base_url, timeout_s=15):
        time.sleep(2)  # both replicas serve, so both have CPU time
    victim = busiest_router(proc)
    os.kill(victim, signal.SIGSTOP)  # a forward pass that holds the GIL and never returns looks like this
    stopped_at = time.monotonic()
    try:
        with Load(base_url, timeout_s=15) as load:
            gone = wait_until(lambda: victim not in routers(proc) or None, "the wedged replica to be replaced",
                              timeout_s=90, every_s=1)
            replaced_s = time.monotonic() - stopped_at
            time.sleep(2)
        back_s = ok_after(base_url, stopped_at)
    finally:
        try:
            os.kill(victim, signal.SIGCONT)
        except ProcessLookupError:
            pass
    wait_until(lambda: len(routers(proc)) == 2, "two Router replicas again", timeout_s=60)
    print(f"\nwedged replica: replaced after {replaced_s:.1f} s; {dict(load.outcomes)}; "
          f"failures {len(load.failures)}; full service after {back_s:.1f} s")
    assert gone and load.outcomes["200"] > 0
    assert len(load.failures) <= 4 * CLIENTS, load.failures
