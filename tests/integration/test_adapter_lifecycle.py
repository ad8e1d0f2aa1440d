"""An adapter's whole life against a secured service of its own: trained with the CLI while the
service runs, loaded through the admin API and served without a restart, kept across a full
restart of Ray and the application, and unloaded. Admin routes need the admin key; an
inference key gets 403 there.

The service here serves only the tiny embedder, with inference and admin keys configured, and
its registry state in a temporary directory shared by both starts. It runs as `loraserve up`
in a subprocess (its own Ray), so it neither disturbs nor depends on the session's service.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import service_config, start_up

REPO = Path(__file__).resolve().parents[2]
INFER_KEY, ADMIN_KEY = "infer-key-1", "admin-key-1"


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    (root / "store").mkdir()
    return root


class Up:
    """`loraserve up` with inference and admin keys; ``stop()`` is Ctrl-C."""

    def __init__(self, tiny_models, places):
        setup = service_config(tiny_models, places / "store", places / "state", band=1)
        args = setup.args
        setup.keep_models("tiny")
        args["adapters"]["preload"] = []
        args["auth"] = {"api_keys_env": "LIFECYCLE_INFER_KEYS", "admin_keys_env": "LIFECYCLE_ADMIN_KEYS"}
        env = {"LIFECYCLE_INFER_KEYS": INFER_KEY, "LIFECYCLE_ADMIN_KEYS": ADMIN_KEY}
        self.proc, self.log, self.base_url = start_up(setup, places, env)

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(timeout=90) == 0


def clients(svc):
    return (httpx.Client(base_url=svc.base_url, timeout=60, headers={"Authorization": f"Bearer {INFER_KEY}"}),
            httpx.Client(base_url=svc.base_url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"}))


def test_train_load_serve_restart_unload(tiny_models, places):
    svc = Up(tiny_models, places)
    try:
        user, admin = clients(svc)
        # While the service runs: train a LoRA adapter with the CLI into the store root.
        out = places / "store" / "fresh-sentiment"
        cmd = [sys.executable, "-m", "models.training.finetune", "--base", str(tiny_models["embed"]),
               "--train", str(REPO / "models/data/sentiment/train.jsonl"),
               "--eval", str(REPO / "models/data/sentiment/test.jsonl"),
               "--out", str(out), "--epochs", "1", "--max-length", "32", "--rank", "4"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert done.returncode == 0, done.stderr[-2000:]

        # An inference key may not manage adapters; the admin key may.
        body = {"lora_name": "fresh", "lora_path": "fresh-sentiment"}
        r = user.post("/v1/load_lora_adapter", json=body)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert user.get("/v1/adapters").status_code == 403
        t0 = time.perf_counter()
        r = admin.post("/v1/load_lora_adapter", json=body)  # base inferred from the adapter config
        assert r.status_code == 200, r.text
        first = user.post("/v1/classify", json={"model": "fresh", "input": ["I loved it", "awful"]})
        elapsed = time.perf_counter() - t0
        assert first.status_code == 200, first.text
        print(f"admin load -> first served answer: {elapsed * 1000:.0f} ms")
        assert elapsed < 10  # a hang guard; the latency itself is measured by loadtest/bench_adapters.py
        assert {row["label"] for row in first.json()["data"]} <= {"negative", "positive"}
        assert user.post("/v1/classify", json={"model": "fresh", "input": "x"},
                         headers={"Authorization": "Bearer nope"}).status_code == 401
        before = first.json()["data"]
    finally:
        svc.stop()

    svc = Up(tiny_models, places)  # a full restart: new Ray, new registry actor, same state dir
    try:
        user, admin = clients(svc)
        models = {m["id"]: m for m in user.get("/v1/models").json()["data"]}
        state = "".join(f.read_text() for f in sorted((places / "state").glob("adapters.*")))  # snapshot + log
        assert "fresh" in models, (list(models), admin.get("/v1/adapters").text, state)
        assert models["fresh"]["parent"] == "tiny"
        again = user.post("/v1/classify", json={"model": "fresh", "input": ["I loved it", "awful"]})
        assert again.status_code == 200 and again.json()["data"] == before
        assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 200
        gone = user.post("/v1/classify", json={"model": "fresh", "input": "x"})
        assert gone.status_code == 404
    finally:
        svc.stop()
