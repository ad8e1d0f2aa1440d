"""`loraserve up` (what `make up` runs): serves, prints its URLs, and Ctrl-C leaves nothing behind."""

import re
import signal
from pathlib import Path

import httpx

from tests.integration.conftest import service_config, start_up
from tests.waiting import wait_until


def _processes_mentioning(fragment: str) -> list[str]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmd:
            found.append(f"{proc.name}: {cmd[:120]}")
    return found


def _session_of_children(pid: int) -> str | None:
    """The Ray session folder name of the Ray that process ``pid`` started (its children)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and "session_" in cmd:
            return "session_" + cmd.split("session_", 1)[1].split("/")[0].split()[0]
    return None


def test_up_serves_then_sigint_stops_ray_and_haproxy(tiny_models, tmp_path):
    setup = service_config(tiny_models, tmp_path / "store", tmp_path / "state", band=1)
    args = setup.args
    setup.keep_models("tiny")
    args["adapters"]["preload"] = []  # the demo adapters are on minilm
    port = setup.port
    proc, log, _ = start_up(setup, tmp_path)
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"model": "tiny", "input": "up"})
        assert r.status_code == 200

        def printed_urls():  # the URLs are printed once Serve reports the app RUNNING
            log.seek(0)
            text = log.read()
            return text if "Ctrl-C stops everything" in text else None

        printed = wait_until(printed_urls, "the URLs to be printed")
        assert f"http://127.0.0.1:{port}/v1" in printed
        assert f"http://127.0.0.1:{setup.metrics_port}/metrics" in printed
        # this run's HAProxy (its config lies in the run folder the CLI printed; other services
        # may run beside this test) and Ray session (its children's folder)
        run_dirs = set(re.findall(r"run files (\S+)", printed))
        assert any("haproxy" in p for d in run_dirs for p in _processes_mentioning(d)), run_dirs
        session = _session_of_children(proc.pid)
        assert run_dirs and session, (run_dirs, session)
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=90)
    assert rc == 0
    # Ray's processes get SIGTERM on shutdown and may take a moment to exit: wait for that.
    def leftovers():
        return [p for d in run_dirs for p in _processes_mentioning(d)] + _processes_mentioning(session)

    wait_until(lambda: not leftovers(), "Ray's and HAProxy's processes to exit", timeout_s=30)
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        still_up = True
    except httpx.HTTPError:
        still_up = False
    assert not still_up, "port still answers after Ctrl-C"
