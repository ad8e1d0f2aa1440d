"""`loraserve up` (what `make up` runs): it serves and prints its URLs; SIGTERM at each stage
(building variants, deploying, serving) and SIGINT (Ctrl-C) while serving end every process it
started, free its ports, remove its run folder, exit 0 without a traceback, and the next start
works at once. While it starts, a request is refused or answered 503 ``not_ready`` in the error
envelope (never a plain-text 404); once up, every port it listens on is on the API's host
(127.0.0.1), save the one Ray hard-codes.

The serving test is also an adapter's whole life against a secured service: trained with the CLI
while the service runs, loaded through the admin API and served without a restart, kept across
the full restart (new Ray, new registry actor, the same state directory), and unloaded. Admin
routes need the admin key; an inference key gets 403 there, a wrong key 401.
"""

import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from serve.processes import cmdline, descendants, matching
from tests.integration.conftest import service_config
from tests.integration.sockets import listening as listeners
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
INFER_KEY, ADMIN_KEY = "infer-key-1", "admin-key-1"
KEYS = {"CLI_INFER_KEYS": INFER_KEY, "CLI_ADMIN_KEYS": ADMIN_KEY}


def launch(setup, folder: Path, env: dict | None = None):
    """`loraserve up` in its own session, output to a log file (not waiting for anything)."""
    path = folder / f"up-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(setup.config))
    env_path = path.with_suffix(".env")
    env_path.write_text("".join(f"{k}={v}\n" for k, v in setup.ray_env.items()))
    log = open(path.with_suffix(".log"), "w+")
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "up", "--config", str(path), "--ray-env",
                             str(env_path), "--metrics-export-port", str(setup.metrics_port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    return proc, log


def printed(log) -> str:
    log.seek(0)
    return log.read()


def ports_of(setup) -> list[int]:
    env = setup.ray_env
    return [setup.port, setup.metrics_port, int(env["RAY_SERVE_HAPROXY_STATS_PORT"]),
            int(env["RAY_SERVE_HAPROXY_METRICS_PORT"]), int(env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"])]


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def healthy(setup) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{setup.port}/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def stop_and_check(proc, log, setup, sig) -> dict:
    tree = descendants(proc.pid)
    run_dirs = set(re.findall(r"run folder ([^\s)]+)", printed(log)))
    t = time.monotonic()
    proc.send_signal(sig)
    rc = proc.wait(timeout=90)
    took = time.monotonic() - t
    def gone():
        alive = {p: cmdline(p)[:80] for p in tree if Path(f"/proc/{p}").exists()}
        busy = [p for p in ports_of(setup) if listening(p)]
        return not alive and not busy
    wait_until(gone, "every process of the service to exit and its ports to close", timeout_s=30, every_s=0.5)
    return {"rc": rc, "took_s": took, "run_dirs": run_dirs, "text": printed(log)}


@pytest.fixture
def setup(tiny_models, tmp_path):
    s = service_config(tiny_models, tmp_path / "store", tmp_path / "state", band=1)
    s.keep_models("tiny")
    s.args["adapters"]["preload"] = []
    s.args["models"][0]["variants"] = ["torch"]  # quick starts; the building test adds ONNX
    return s


def test_sigterm_while_building_variants(setup, tmp_path, reaper):
    setup.args["models"][0]["variants"] = ["torch", "onnx", "onnx-int8"]
    setup.args["variants"] = {"cache_dir": str(tmp_path / "variants")}  # a fresh cache: start builds
    proc, log = launch(setup, tmp_path)
    reaper.append(proc)
    wait_until(lambda: "exporting" in printed(log) or proc.poll() is not None, "the variant build to start",
               timeout_s=120, every_s=0.05)
    assert "Ray started" not in printed(log)
    out = stop_and_check(proc, log, setup, signal.SIGTERM)
    assert out["rc"] == 0, out["text"][-2000:]
    assert "Traceback" not in out["text"], out["text"][-2000:]
    assert out["run_dirs"] and not any(Path(d).exists() for d in out["run_dirs"])


def test_sigterm_while_deploying(setup, tmp_path, reaper):
    proc, log = launch(setup, tmp_path)
    reaper.append(proc)
    wait_until(lambda: "Ray started" in printed(log) or proc.poll() is not None, "Ray to start",
               timeout_s=180, every_s=0.1)
    assert not healthy(setup)
    out = stop_and_check(proc, log, setup, signal.SIGTERM)
    assert out["rc"] == 0, out["text"][-2000:]
    assert "Traceback" not in out["text"] and "core dumped" not in out["text"], out["text"][-2000:]
    assert out["run_dirs"] and not any(Path(d).exists() for d in out["run_dirs"])


@pytest.fixture
def reaper():
    """Processes a test started; any still running when it ends (a failed test) get SIGINT."""
    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=90)


def answer_while_starting(setup) -> tuple[int, str, str | None] | None:
    """What a client (with an inference key) sees now: None when the connection is refused, else
    status, type, code."""
    try:
        r = httpx.get(f"http://127.0.0.1:{setup.port}/v1/models", timeout=5,
                      headers={"Authorization": f"Bearer {INFER_KEY}"})
    except httpx.TransportError:
        return None
    if r.status_code == 200:
        return 200, "", None
    assert r.headers.get("content-type", "").startswith("application/json"), (r.status_code, r.text)
    assert r.status_code != 503 or r.headers.get("retry-after"), r.headers
    return r.status_code, r.json()["error"]["type"], r.json()["error"]["code"]


def clients(setup):
    url = f"http://127.0.0.1:{setup.port}"
    return (httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {INFER_KEY}"}),
            httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"}))


def train_load_and_serve(setup, tmp_path, base: Path) -> list:
    """While the service runs: a LoRA adapter trained with the CLI into the store, loaded with the
    admin key (not with an inference key) and served at once; returns its answer."""
    user, admin = clients(setup)
    cmd = [sys.executable, "-m", "models.training.finetune", "--base", str(base),
           "--train", str(REPO / "models/data/sentiment/train.jsonl"),
           "--eval", str(REPO / "models/data/sentiment/test.jsonl"),
           "--out", str(tmp_path / "store" / "fresh-sentiment"), "--epochs", "1", "--max-length", "32", "--rank", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
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
    assert elapsed < 10  # a hang guard; the latency itself is measured by loadtest/bench_adapters.py
    assert {row["label"] for row in first.json()["data"]} <= {"negative", "positive"}
    assert user.post("/v1/classify", json={"model": "fresh", "input": "x"},
                     headers={"Authorization": "Bearer nope"}).status_code == 401
    return first.json()["data"]


def still_there_then_unload(setup, before: list, state: Path) -> None:
    """After the restart: the adapter is listed and answers as before; unloaded, it is gone."""
    user, admin = clients(setup)
    models = {m["id"]: m for m in user.get("/v1/models").json()["data"]}
    saved = "".join(f.read_text() for f in sorted(state.glob("adapters.*")))  # snapshot + log
    assert "fresh" in models, (list(models), admin.get("/v1/adapters").text, saved)
    assert models["fresh"]["parent"] == "tiny"
    again = user.post("/v1/classify", json={"model": "fresh", "input": ["I loved it", "awful"]})
    assert again.status_code == 200 and again.json()["data"] == before
    assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 200
    assert user.post("/v1/classify", json={"model": "fresh", "input": "x"}).status_code == 404


def test_serve_train_an_adapter_sigterm_start_again_at_once_with_it(setup, tmp_path, reaper, tiny_models):
    setup.args["auth"] = {"api_keys_env": "CLI_INFER_KEYS", "admin_keys_env": "CLI_ADMIN_KEYS"}
    (tmp_path / "store").mkdir(exist_ok=True)
    proc, log = launch(setup, tmp_path, KEYS)
    reaper.append(proc)
    seen = []
    def up() -> bool:
        seen.append(answer_while_starting(setup))
        return seen[-1] is not None and seen[-1][0] == 200
    wait_until(lambda: up() or (proc.poll() is not None and pytest.fail(printed(log)[-2000:])),
               "the service to serve", timeout_s=180, every_s=0.1)
    answers = {a for a in seen if a is not None}
    assert answers <= {(200, "", None), (503, "service_unavailable_error", "not_ready"),
                       (503, "service_unavailable_error", "no_replica")}, answers
    assert (503, "service_unavailable_error", "not_ready") in answers, "HAProxy is up before the routes"
    tree = descendants(proc.pid)
    exposed = [(p, cmdline(p)[:40], addr, port) for p, addr, port in listeners(tree)
               if not ipaddress.ip_address(addr).is_loopback]
    # Ray 2.60 binds each replica's inter-deployment gRPC server to [::]:0
    # (ray/serve/_private/replica.py, `add_port_to_grpc_server(self._server, "[::]:0")`).
    assert all(c.startswith("ray::ServeReplica") and addr == "::" for _, c, addr, _ in exposed), exposed
    assert len(listeners(tree)) > 10  # the check saw the service's sockets at all
    text = wait_until(lambda: "Ctrl-C stops everything" in printed(log) and printed(log), "the URLs")
    assert f"http://127.0.0.1:{setup.port}/v1" in text
    assert f"http://127.0.0.1:{setup.metrics_port}/metrics" in text
    run_dir = re.findall(r"run folder ([^\s)]+)", text)[0]
    haproxy = [p for p in matching(run_dir) if "haproxy" in cmdline(p)]  # its config is in the run folder
    assert haproxy, "HAProxy runs (RAY_SERVE_ENABLE_HA_PROXY=1)"
    before = train_load_and_serve(setup, tmp_path, tiny_models["embed"])
    out = stop_and_check(proc, log, setup, signal.SIGTERM)
    assert not [p for p in haproxy if Path(f"/proc/{p}").exists()], "HAProxy outlived the stop"
    assert out["rc"] == 0 and out["took_s"] < 60, out
    assert out["run_dirs"] and not any(Path(d).exists() for d in out["run_dirs"])
    again, log2 = launch(setup, tmp_path, KEYS)  # same ports: nothing may still hold them
    reaper.append(again)
    wait_until(lambda: healthy(setup) or (again.poll() is not None and pytest.fail(printed(log2)[-2000:])),
               "the second start to serve", timeout_s=180, every_s=0.5)
    still_there_then_unload(setup, before, tmp_path / "state")
    stop_and_check(again, log2, setup, signal.SIGINT)
