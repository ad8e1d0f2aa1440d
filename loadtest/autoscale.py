"""Autoscaling, seen: Locust ramps the load up and down on a two-node cluster while ``serve
status`` records the replicas of every deployment; the report shows scale-up under load and
scale-down after, with a plot.

The cluster is ``loadtest.cluster`` (``ray start`` head + worker, deploy/ray.env, token auth);
the application is deploy/cluster.yaml as committed, whose ``ModelServer-minilm-torch`` entry
holds the autoscaling settings under test. Load: embeddings on ``minilm`` (the torch model
server), closed loop, ``--stages`` (users per step). Written to loadtest/results/autoscaling.md,
.json and autoscaling.png.

    .venv/bin/python -m loadtest.autoscale [--stages 30:1,90:12,90:1]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time

import yaml

from loadtest import locust_run, report
from loadtest.cluster import BIN, Cluster, replicas
from loadtest.cluster_demo import CONFIG, TORCH, watch
from loadtest.report import REPO, RESULTS, say

NAME = "autoscaling"


def scaled(timeline: list[dict], deployment: str) -> dict:
    """When the deployment first reached its most replicas, and when it came back down."""
    counts = [(row["t"], row[deployment]) for row in timeline if deployment in row]
    start = counts[0][1] if counts else 0
    peak = max((c for _, c in counts), default=0)
    up_at = next((t for t, c in counts if c == peak), None)
    down_at = next((t for t, c in counts if up_at is not None and t > up_at and c < peak), None)
    return {"start": start, "peak": peak, "peak_at_s": up_at, "end": counts[-1][1] if counts else 0,
            "first_down_at_s": down_at}


def run(a) -> dict:
    subprocess.run([str(BIN / "loraserve"), "export", "--config", str(CONFIG)], check=True, cwd=REPO,
                   capture_output=True)
    cluster = Cluster(log=say)
    data: dict = {}
    try:
        head = cluster.start_head(a.cpus, {"loraserve_model": a.slots})
        worker = cluster.add_worker("worker-1", a.cpus, {"loraserve_model": a.slots})
        data["nodes"] = [{"name": n.name, "num_cpus": n.num_cpus, "resources": n.resources} for n in (head, worker)]
        cluster.serve_deploy(CONFIG)
        cluster.wait_running()
        say(f"RUNNING; replicas {replicas(cluster.serve_status())}; load stages {a.stages}")
        timeline: list = []
        stop = threading.Event()
        t0 = time.monotonic()
        watcher = threading.Thread(target=watch, args=(cluster, stop, timeline, t0, 2.0), daemon=True)
        watcher.start()
        out = cluster.run_dir / "locust"
        proc = locust_run.run(f"http://127.0.0.1:{head.http_port}", out, stages=a.stages,
                              env={"LORASERVE_USERS": "embed:1", "LORASERVE_SLO_P95_MS": "60000",
                                   "LORASERVE_SLO_FAIL_RATIO": "1"})
        say("load done; watching for scale-down")
        time.sleep(a.tail)
        stop.set()
        watcher.join(10)
        data.update(timeline=timeline, history=locust_run.history(out), totals=locust_run.totals(out),
                    locust_exit=proc.returncode)
        data["torch"] = scaled(timeline, TORCH)
        extra = {d: [(row["t"], row[d]) for row in timeline if d in row] for d in (TORCH, "Router")}
        png = locust_run.plot(out, data["history"], extra, "Autoscaling: load ramp, replicas")
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, RESULTS / f"{NAME}.png")
    finally:
        cluster.stop()
    return data


def body(d: dict, settings: dict) -> str:
    s = d["torch"]
    agg = d["totals"].get("Aggregated", {})
    nodes = ", ".join(f"{n['name']} --num-cpus={n['num_cpus']} {n['resources']}" for n in d["nodes"])
    return "\n".join([
        "## Result", "",
        f"`{TORCH}` went from {s['start']} replica(s) to {s['peak']} under load (peak first seen at "
        f"t={s['peak_at_s']} s) and back down to {s['end']} after the load fell "
        f"(first step down at t={s['first_down_at_s']} s).", "",
        f"- autoscaling settings (deploy/cluster.yaml): `{settings}`",
        f"- nodes: {nodes}",
        f"- Locust: {agg.get('requests')} requests, {agg.get('failures')} failed; p50 {agg.get('p50_ms')} ms, "
        f"p95 {agg.get('p95_ms')} ms over the whole run", "",
        f"![users, throughput, latency, failures and replicas over time]({NAME}.png)", "",
        "Replicas over time (`serve status`, RUNNING):", "",
        f"| t (s) | {TORCH} | Router |", "|---|---|---|",
        *[f"| {row['t']} | {row.get(TORCH, '-')} | {row.get('Router', '-')} |" for row in d["timeline"]],
    ])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default="30:1,90:12,60:1", help="seconds:users steps")
    p.add_argument("--tail", type=float, default=40, help="seconds to keep watching after the load")
    p.add_argument("--cpus", type=int, default=2, help="--num-cpus each node declares")
    p.add_argument("--slots", type=int, default=3, help="loraserve_model slots each node declares")
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)
    config = yaml.safe_load(CONFIG.read_text())
    settings = next(d for d in config["applications"][0]["deployments"] if d["name"] == TORCH)
    started = time.monotonic()
    data = run(a)
    notes = [f"load: Locust on the head's proxy, embeddings on minilm, closed loop, stages {a.stages} "
             "(seconds:users); Locust shares the 2 cores with both nodes, so latencies include that",
             f"replicas read every ~2 s from `serve status`; watched {a.tail:g} s after the load ended",
             f"wall time {time.monotonic() - started:.0f} s"]
    report.write(NAME, "Autoscaling under a Locust ramp (two-node cluster)",
                 report.machine(argv, "loadtest.autoscale", 1), notes,
                 body(data, settings.get("autoscaling_config")), data, output=a.output)
    say(f"torch model server: {data['torch']}")
    return 0 if data["torch"]["peak"] > data["torch"]["start"] and data["torch"]["end"] < data["torch"]["peak"] else 1


if __name__ == "__main__":
    sys.exit(main())
