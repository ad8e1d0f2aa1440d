"""A real two-node Ray cluster (`ray start` head + worker, `serve deploy`), and the worker node
lost under load: the service goes on through the head; the failures are counted and bounded."""

import os
import signal
import time

import httpx
import pytest
import yaml

from loadtest.cluster import Cluster, replicas
from serve.processes import descendants
from tests.integration.conftest import free_port
from tests.integration.load import CLIENTS, Load
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def cluster(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    config = yaml.safe_load(open("deploy/cluster.yaml"))
    config["http_options"]["port"] = free_port()
    app = config["applications"][0]
    app["deployments"] = [
        {"name": "Router", "num_replicas": 2, "max_replicas_per_node": 1, "ray_actor_options": {"num_cpus": 0.25}},
        {"name": "ModelServer-tiny-torch", "num_replicas": 2, "max_replicas_per_node": 1,
         "health_check_period_s": 1, "health_check_timeout_s": 4,
         "ray_actor_options": {"num_cpus": 0.5, "resources": {"loraserve_model": 1}}},
    ]
    app["args"] = {"models": [{"id": "tiny", "source": str(tiny_models["embed"]), "task": "embed",
                               "placement": "separate", "torch_threads": 1, "variants": ["torch"]}],
                   "adapters": {"stores": [str(folder / "store")], "state_dir": str(folder / "state")}}
    path = folder / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    c = Cluster(log=lambda msg: None)
    try:
        c.head = c.start_head(2, {"loraserve_model": 1}, metrics_port=free_port())
        c.worker = c.add_worker("worker-1", 2, {"loraserve_model": 1})
        c.serve_deploy(path)
        c.wait_running(timeout_s=240)
        c.base_url = f"http://127.0.0.1:{config['http_options']['port']}"
        yield c
    finally:
        left = c.stop()
        assert not c.run_dir.exists()
        print(f"\ncluster stop: killed after the grace period: {left}")


def test_both_nodes_answer_through_serve_deploy(cluster):
    for url in (cluster.base_url, f"http://127.0.0.1:{cluster.worker.http_port}"):  # each node's proxy
        r = httpx.post(f"{url}/v1/embeddings", json={"model": "tiny", "input": "a cluster"}, timeout=30)
        assert r.status_code == 200 and len(r.json()["data"]) == 1, (url, r.text[:200])
    assert replicas(cluster.serve_status()) == {"Router": 2, "ModelServer-tiny-torch": 2}


def test_worker_node_lost_under_load(cluster):
    raylets = cluster.worker_pids(cluster.worker)
    assert len(raylets) == 1, raylets
    node = set(raylets) | set(descendants(raylets[0]))
    with Load(cluster.base_url, timeout_s=20) as load:
        time.sleep(3)
        lost_at = time.monotonic()
        for pid in node:  # the whole node at once, as when a machine dies
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(15)
    def ten_ok():
        return all(httpx.post(f"{cluster.base_url}/v1/embeddings", json={"model": "tiny", "input": "x"},
                              timeout=10).status_code == 200 for _ in range(10))
    wait_until(ten_ok, "the head to serve ten in a row", timeout_s=60, every_s=1)
    back_s = time.monotonic() - lost_at
    print(f"\nworker node lost: {dict(load.outcomes)}; failures {load.failures}; ten good answers "
          f"in a row {back_s:.1f} s after the loss")
    assert load.outcomes["200"] > 0
    assert len(load.failures) <= 3 * CLIENTS, load.failures
