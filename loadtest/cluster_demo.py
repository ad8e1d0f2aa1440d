"""`serve deploy` onto a real two-node Ray cluster, and a config update under Locust load.

What an operator does, scripted (``make cluster-demo``):

1. ``loraserve export --config deploy/cluster.yaml``: the ONNX variants, in the variant cache
   both nodes share (one disk here; on separate machines each node builds its own under a lock).
2. ``ray start --head`` and ``ray start --address ...`` for a worker node, each declaring
   ``--num-cpus`` and the custom resource ``loraserve_model`` that places model servers, with
   deploy/ray.env in their environment and token authentication on (``loadtest.cluster``).
3. ``serve deploy deploy/cluster.yaml``, then ``serve status`` until RUNNING; embeddings and
   classification are checked on both nodes' proxies.
4. Locust (``loadtest/locustfile.py``: embeddings plus classification over the adapters with
   Zipf popularity) runs for ``--duration`` s; meanwhile ``serve deploy`` applies an update: the
   torch model server goes from 1 to 2 replicas (its ``autoscaling_config`` floor) and a third
   adapter joins the preload. Serve rolls the application over; Locust counts every failed
   request (KubeRay's zero-downtime upgrade test asserts the same way, on Locust's counts).
5. Everything this run started is stopped (never ``ray stop``); the report goes to
   loadtest/results/cluster-demo.md and .json.

    .venv/bin/python -m loadtest.cluster_demo [--duration 90] [--users 8]
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import yaml

from loadtest import locust_run, report
from loadtest.cluster import BIN, Cluster, replicas
from loadtest.report import REPO, say

NAME = "cluster-demo"
CONFIG = REPO / "deploy" / "cluster.yaml"
TORCH = "ModelServer-minilm-torch"


def updated(config: dict) -> dict:
    """The update: the torch model server's floor 1 -> 2 replicas, one more preloaded adapter."""
    new = copy.deepcopy(config)
    app = new["applications"][0]
    for d in app["deployments"]:
        if d["name"] == TORCH:
            d["autoscaling_config"].update(min_replicas=2, initial_replicas=2)
    app["args"]["adapters"]["preload"].append({"name": "sentiment-v2", "base": "minilm", "path": "sentiment"})
    return new


def check_answers(base_url: str) -> dict:
    """Embeddings and classification answer on one node's proxy."""
    with httpx.Client(base_url=base_url, timeout=60) as c:
        e = c.post("/v1/embeddings", json={"model": "minilm", "input": "a cluster"})
        k = c.post("/v1/classify", json={"model": "sentiment", "input": "what a lovely day"})
    assert e.status_code == 200 and len(e.json()["data"][0]["embedding"]) == 384, e.text[:300]
    assert k.status_code == 200 and k.json()["data"][0]["label"], k.text[:300]
    return {"embeddings": e.status_code, "classify": k.status_code, "label": k.json()["data"][0]["label"]}


def locust_counts(out: Path) -> dict:
    """Locust's totals (``loadtest.locust_run``), per route, with the failures by kind."""
    routes = locust_run.totals(out)
    total = routes.pop("Aggregated")
    kinds = out / "locust_failures.csv"
    return {**{k: total[k] for k in ("requests", "failures", "p50_ms", "p95_ms", "p99_ms", "rps")},
            "failure_kinds": [dict(r) for r in csv.DictReader(open(kinds))] if kinds.exists() else [],
            "routes": {n: {"requests": r["requests"], "failures": r["failures"]} for n, r in routes.items()}}


def watch(cluster: Cluster, stop: threading.Event, out: list, t0: float, every_s: float = 3.0) -> None:
    """Replica counts per deployment over time, from ``serve status``."""
    while not stop.is_set():
        try:
            out.append({"t": round(time.monotonic() - t0, 1), **replicas(cluster.serve_status())})
        except Exception as exc:  # a status call may fail mid-update; record the gap
            out.append({"t": round(time.monotonic() - t0, 1), "error": str(exc)[:100]})
        stop.wait(every_s)


def run(a) -> dict:
    say("building or finding the ONNX variants (loraserve export)")
    subprocess.run([str(BIN / "loraserve"), "export", "--config", str(CONFIG)], check=True, cwd=REPO,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    cluster = Cluster(log=say)
    data: dict = {"nodes": []}
    try:
        head = cluster.start_head(a.cpus, {"loraserve_model": a.slots})
        worker = cluster.add_worker("worker-1", a.cpus, {"loraserve_model": a.slots})
        data["nodes"] = [{"name": n.name, "num_cpus": n.num_cpus, "resources": n.resources,
                          "proxy_port": n.http_port} for n in (head, worker)]
        cluster.serve_deploy(CONFIG)
        t = time.monotonic()
        status = cluster.wait_running()
        data["deploy_s"] = round(time.monotonic() - t, 1)
        data["replicas_before"] = replicas(status)
        data["answers"] = {n.name: check_answers(f"http://127.0.0.1:{n.http_port}") for n in (head, worker)}
        say(f"RUNNING in {data['deploy_s']} s; both nodes answer; replicas {data['replicas_before']}")

        new_path = cluster.run_dir / "cluster-updated.yaml"
        new_path.write_text(yaml.safe_dump(updated(yaml.safe_load(CONFIG.read_text())), sort_keys=False))
        out_dir = cluster.run_dir / "locust"
        timeline: list = []
        stop = threading.Event()
        t0 = time.monotonic()
        watcher = threading.Thread(target=watch, args=(cluster, stop, timeline, t0), daemon=True)
        watcher.start()
        proc = locust_run.run(f"http://127.0.0.1:{head.http_port}", out_dir, users=a.users, time_s=a.duration,
                              env={"LORASERVE_SLO_P95_MS": "60000", "LORASERVE_SLO_FAIL_RATIO": "1"},
                              wait=False)  # this scenario judges the failures, not Locust's SLO
        time.sleep(a.update_at)
        say(f"applying the update under load (t={time.monotonic() - t0:.0f} s)")
        data["update_sent_s"] = round(time.monotonic() - t0, 1)
        cluster.serve_deploy(new_path)
        try:
            cluster.wait_running(settle={TORCH: 2}, timeout_s=a.duration + 60)
            data["update_done_s"] = round(time.monotonic() - t0, 1)
            with httpx.Client(base_url=f"http://127.0.0.1:{head.http_port}", timeout=30) as c:
                models = c.get("/v1/models").json()["data"]
            data["new_adapter_listed"] = any(m["id"] == "sentiment-v2" for m in models)
            say(f"update RUNNING at t={data['update_done_s']} s; waiting for Locust to finish")
        except (TimeoutError, RuntimeError) as exc:
            data["update_error"] = str(exc)[:500]
            say(f"the update did not settle: {exc}")
        out, _ = proc.communicate(timeout=a.duration + 120)
        stop.set()
        watcher.join(10)
        data["locust_exit"] = proc.returncode
        data["locust_tail"] = out[-1500:]
        data["locust"] = locust_counts(out_dir)
        data["replicas_after"] = replicas(cluster.serve_status())
        data["timeline"] = timeline
    finally:
        data["killed_at_stop"] = cluster.stop()
    return data


def body(d: dict) -> str:
    lc = d["locust"]
    if d.get("update_error"):
        return f"## Result\n\nThe update did not settle: {d['update_error']}\n\n" \
               f"Locust: {lc['failures']} failed of {lc['requests']}; timeline: {d['timeline']}"
    nodes = ", ".join(f"{n['name']} ({n['num_cpus']} CPUs, {n['resources']}, proxy :{n['proxy_port']})"
                      for n in d["nodes"])
    lines = [
        "## Result", "",
        f"**{lc['failures']} failed of {lc['requests']} requests** across the `serve deploy` update "
        f"(sent at t={d['update_sent_s']} s, RUNNING with the new replica count at "
        f"t={d['update_done_s']} s); the new adapter listed afterwards: {d['new_adapter_listed']}.", "",
        f"- cluster: {nodes}",
        f"- first deploy RUNNING after {d['deploy_s']} s; embeddings and classification answered on both proxies",
        f"- replicas before: {d['replicas_before']}; after: {d['replicas_after']}",
        f"- Locust: {lc['rps']:.1f} req/s; p50 {lc['p50_ms']:.0f} ms, p95 {lc['p95_ms']:.0f} ms, p99 {lc['p99_ms']:.0f} ms",
        "", "| route | requests | failures |", "|---|---|---|",
        *[f"| {name} | {r['requests']} | {r['failures']} |" for name, r in lc["routes"].items()],
    ]
    if lc["failure_kinds"]:
        lines += ["", "Failures by kind:", "",
                  *[f"- {f.get('Occurrences')} x {f.get('Method')} {f.get('Name')}: {f.get('Error', '')[:200]}"
                    for f in lc["failure_kinds"]]]
    lines += ["", "Replicas over time (`serve status`, RUNNING per deployment):", "",
              "| t (s) | " + " | ".join(sorted(d["replicas_before"])) + " |",
              "|---|" + "---|" * len(d["replicas_before"])]
    for row in d["timeline"]:
        cells = [str(row[k]) if k in row else "status call failed" for k in sorted(d["replicas_before"])]
        lines.append(f"| {row['t']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=90, help="Locust run, seconds")
    p.add_argument("--update-at", type=float, default=20, help="seconds into the run to send the update")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--cpus", type=int, default=2, help="--num-cpus each node declares")
    p.add_argument("--slots", type=int, default=2, help="loraserve_model slots each node declares")
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)
    started = time.monotonic()
    data = run(a)
    facts = report.machine(argv, "loadtest.cluster_demo", 1)
    notes = [f"config: deploy/cluster.yaml, then the same with `{TORCH}` min_replicas 2 and a third preloaded "
             "adapter, applied with `serve deploy` under load",
             f"load: Locust, {a.users} users, closed loop, {a.duration} s, embeddings + classification over "
             "the served adapters (Zipf); Locust runs on the same 2 cores as both nodes: a functional test, "
             "not a throughput figure",
             "nodes: `ray start` head + worker on this machine, token authentication on, deploy/ray.env in "
             "each node's environment", f"wall time {time.monotonic() - started:.0f} s"]
    md, _ = report.write(NAME, "serve deploy onto a two-node Ray cluster, updated under Locust load",
                         facts, notes, body(data), data, output=a.output)
    say(f"wrote {report.rel(md)}: {data['locust']['failures']} failed of {data['locust']['requests']}")
    return 0 if data["locust"]["failures"] == 0 and not data.get("update_error") else 1


if __name__ == "__main__":
    sys.exit(main())
