"""`loraserve up` (what `make up` runs): it serves and prints its URLs; SIGTERM at each stage
(building variants, deploying, serving) and SIGINT (Ctrl-C) while serving end every process it
started, free its ports, remove its run folder, exit 0 without a traceback, and the next start
works at once. While it starts, a request is refused or answered 503 ``not_ready`` in the error
envelope (never a plain-text 404); once up, every port it listens on is on the API's host
(127.0.0.1), save the one Ray hard-codes."""

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


def launch(setup, folder: Path):
    """`loraserve up` in its own session, output to a log file (not waiting for anything)."""
    path = folder / f"up-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(setup.config))
    env_path = path.with_suffix(".env")
    env_path.write_text("".join(f"{k}={v}\n" for k, v in setup.ray_env.items()))
    log = open(path.with_suffix(".log"), "w+")
    proc = subprocess.Popen([sys.executable, "-m", "serve.cli", "up", "--config", str(path), "--ray-env",
                             str(env_path), "--metrics-export-port", str(setup.metrics_port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
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
    """What a client sees now: None when the connection is refused, else status, type, code."""
    try:
        r = httpx.get(f"http://127.0.0.1:{setup.port}/v1/models", timeout=5)
    except httpx.TransportError:
        return None
    if r.status_code == 200:
        return 200, "", None
    assert r.headers.get("content-type", "").startswith("application/json"), (r.status_code, r.text)
    assert r.status_code != 503 or r.headers.get("retry-after"), r.headers
    return r.status_code, r.json()["error"]["type"], r.json()["error"]["code"]


def test_sigterm_while_serving_then_start_again_at_once(setup, tmp_path, reaper):
    proc, log = launch(setup, tmp_path)
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
    r = httpx.post(f"http://127.0.0.1:{setup.port}/v1/embeddings", json={"model": "tiny", "input": "up"})
    assert r.status_code == 200
    text = wait_until(lambda: "Ctrl-C stops everything" in printed(log) and printed(log), "the URLs")
    assert f"http://127.0.0.1:{setup.port}/v1" in text
    assert f"http://127.0.0.1:{setup.metrics_port}/metrics" in text
    run_dir = re.findall(r"run folder ([^\s)]+)", text)[0]
    haproxy = [p for p in matching(run_dir) if "haproxy" in cmdline(p)]  # its config is in the run folder
    assert haproxy, "HAProxy runs (RAY_SERVE_ENABLE_HA_PROXY=1)"
    out = stop_and_check(proc, log, setup, signal.SIGTERM)
    assert not [p for p in haproxy if Path(f"/proc/{p}").exists()], "HAProxy outlived the stop"
    assert out["rc"] == 0 and out["took_s"] < 60, out
    assert out["run_dirs"] and not any(Path(d).exists() for d in out["run_dirs"])
    again, log2 = launch(setup, tmp_path)  # same ports: nothing may still hold them
    reaper.append(again)
    wait_until(lambda: healthy(setup) or (again.poll() is not None and pytest.fail(printed(log2)[-2000:])),
               "the second start to serve", timeout_s=180, every_s=0.5)
    stop_and_check(again, log2, setup, signal.SIGINT)
