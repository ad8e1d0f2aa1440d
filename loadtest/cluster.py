"""A real multi-node Ray cluster on one machine, started the way an operator starts one.

``Cluster`` runs ``ray start --head`` and ``ray start --address ...`` for each worker node, with
deploy/ray.env in every node's environment, then drives Serve with its own CLI (``serve
deploy``, ``serve status``) through the head's dashboard. Several nodes on one machine need
what separate machines get for free, and each node's environment sets it: its own proxy port
(Ray's ``RAY_SERVE_WORKER_PROXY_HTTP_PORT``), HAProxy stats and metrics ports and files,
direct-ingress port ranges, Ray agent ports and metrics export port.

Token authentication is explicit: ``RAY_AUTH_MODE=token`` with a token of the cluster's own in
its run folder (``RAY_AUTH_TOKEN_PATH``, mode 0600), for ``ray start`` and for every ``serve``
command, so the cluster neither depends on nor writes ``~/.ray/auth_token``.

``stop()`` ends only this cluster: Serve is shut down, then every process whose command line
names the run folder (GCS, raylets, agents, HAProxy) gets SIGTERM and, after a grace period,
SIGKILL; replicas exit with their raylet. It never runs ``ray stop``, which would end every Ray
on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loadtest import ports
from loadtest.report import REPO
from serve.node import NodeEnv, load_env_file
from serve.processes import cmdline, descendants, end_all, matching, proc_stat, reap

BIN = Path(sys.executable).parent


@dataclass
class Node:
    """One ``ray start``: its CPUs, custom resources and the ports it must not share."""

    name: str
    num_cpus: int
    resources: dict[str, float] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    metrics_port: int = 0
    http_port: int = 8000


class Cluster:
    def __init__(self, env_file: str | Path = REPO / "deploy" / "ray.env", log=print):
        # short: HAProxy's socket path (max 97 characters) lies below it, with a 56-character
        # folder Ray adds per node
        self.run_dir = Path(tempfile.mkdtemp(prefix="lsc-", dir="/tmp"))
        self.base_env = load_env_file(env_file)
        self.log = log
        self.nodes: list[Node] = []
        self.gcs_port, self.dashboard_port = ports.pick_ports(2)
        self.token = self.run_dir / "auth_token"
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token)}

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, node: Node | None = None) -> dict[str, str]:
        """A command's environment: ours, the node's variables, token authentication."""
        return {**os.environ, "LORASERVE_HOME": str(REPO), "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", **(node.env if node else {}), **self.auth}

    def _node_env(self, name: str, index: int) -> dict[str, str]:
        """deploy/ray.env, with what nodes sharing one machine must not share."""
        env = dict(self.base_env)
        folder = self.run_dir / f"n{index}"
        folder.mkdir()
        env.update(RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=str(folder / "haproxy.cfg"),
                   RAY_SERVE_HAPROXY_SOCKET_PATH=str(folder / "admin.sock"),
                   RAY_SERVE_HAPROXY_SERVER_STATE_BASE=str(folder),
                   RAY_SERVE_HAPROXY_SERVER_STATE_FILE=str(folder / "server-state"),
                   **NodeEnv(env).haproxy_wrapper())
        if index:
            stats, prom, fallback = ports.pick_ports(3)
            direct = ports.pick_block(100)
            grpc = ports.pick_block(100, avoid=[direct])
            env.update(RAY_SERVE_HAPROXY_STATS_PORT=str(stats), RAY_SERVE_HAPROXY_METRICS_PORT=str(prom),
                       RAY_SERVE_FALLBACK_PROXY_HTTP_PORT=str(fallback),
                       RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(direct[0]),
                       RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(direct[1]),
                       RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT=str(grpc[0]),
                       RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT=str(grpc[1]))
        return env

    def _run(self, argv: list[str], env: dict, timeout_s: float = 120, check: bool = True) -> str:
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])} failed ({out.returncode}): "
                               f"{(out.stderr or out.stdout)[-1500:]}{self._raylet_logs()}")
        return out.stdout

    def _raylet_logs(self) -> str:
        """The end of each raylet's and GCS's logs: why a node did not start."""
        out = []
        for log in sorted((self.run_dir / "ray").glob("session_*/logs/*")):
            if log.name.startswith(("raylet", "gcs_server")) and log.suffix in (".out", ".err"):
                tail = log.read_text(errors="replace").strip().splitlines()[-6:]
                if tail:
                    out.append(f"\n--- {log.name}\n" + "\n".join(tail))
        return "".join(out)

    def start_head(self, num_cpus: int, resources: dict | None = None, metrics_port: int = 8080) -> Node:
        node = Node("head", num_cpus, resources or {}, self._node_env("head", 0), metrics_port)
        self.log(f"ray start --head (GCS :{self.gcs_port}, dashboard :{self.dashboard_port}, "
                 f"{num_cpus} CPUs, resources {node.resources})")
        self._run([str(BIN / "ray"), "start", "--head", f"--port={self.gcs_port}",
                   "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                   f"--resources={json.dumps(node.resources)}", f"--metrics-export-port={metrics_port}",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.run_dir / 'ray'}",
                   *_worker_ports(0), "--disable-usage-stats"], self.env(node))
        self.nodes.append(node)
        return node

    def add_worker(self, name: str, num_cpus: int, resources: dict | None = None) -> Node:
        index = len(self.nodes)
        http, metrics, agent, agent_grpc, runtime_env, manager = ports.pick_ports(6)
        env = {**self._node_env(name, index), "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(http)}
        node = Node(name, num_cpus, resources or {}, env, metrics, http)
        self.log(f"ray start --address (node {name}: {num_cpus} CPUs, resources {node.resources}, "
                 f"proxy :{http})")
        self._run([str(BIN / "ray"), "start", f"--address=127.0.0.1:{self.gcs_port}",
                   "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
                   f"--resources={json.dumps(node.resources)}", f"--metrics-export-port={metrics}",
                   f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                   f"--runtime-env-agent-port={runtime_env}", f"--node-manager-port={manager}",
                   *_worker_ports(index), "--disable-usage-stats"], self.env(node))
        self.nodes.append(node)
        return node

    def worker_pids(self, node: Node) -> list[int]:
        """The raylet of ``node`` (its ``--metrics-export-port`` tells it apart)."""
        return [pid for pid in matching(str(self.run_dir))
                if "raylet" in cmdline(pid) and f"--metrics_export_port={node.metrics_port}" in cmdline(pid)]

    # -- Serve through its own CLI ---------------------------------------------------------------
    def serve_deploy(self, config: str | Path) -> None:
        self.log(f"serve deploy {config}")
        self._run([str(BIN / "serve"), "deploy", str(config), "--address", self.dashboard], self.env())

    def serve_status(self) -> dict:
        out = self._run([str(BIN / "serve"), "status", "--address", self.dashboard], self.env(), timeout_s=30)
        return yaml.safe_load(out) or {}

    def wait_running(self, app: str = "loraserve", timeout_s: float = 600, settle: dict | None = None) -> dict:
        """Until ``app`` is RUNNING (and, when given, deployments have ``settle`` replicas)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                status = self.serve_status()
            except (RuntimeError, subprocess.TimeoutExpired):
                status = {}
            state = (status.get("applications") or {}).get(app, {})
            if state.get("status") == "RUNNING" and all(
                    replicas(status, app).get(d) == n for d, n in (settle or {}).items()):
                return status
            if state.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(f"{app}: {state.get('status')}: {state.get('message', '')[-800:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{app} not RUNNING after {timeout_s:g} s: {state.get('status')}")
            time.sleep(2)

    def stop(self) -> list[str]:
        """Shut Serve down, end this cluster's processes; returns what had to be killed."""
        try:
            self._run([str(BIN / "serve"), "shutdown", "-y", "--address", self.dashboard], self.env(),
                      timeout_s=60, check=False)
        except subprocess.TimeoutExpired:
            pass
        # Ray's agents rename themselves (``ray::DashboardAgent``), so the run folder is not in
        # their command line: take every descendant of the processes that name it.
        tree: dict[int, str] = {}
        for root in matching(str(self.run_dir)):
            if (stat := proc_stat(root)) is not None:
                tree[root] = stat[19]
                tree.update(descendants(root))
        names = {p: cmdline(p)[:60] for p in tree}
        left = [f"{p} {names[p]}" for p in end_all(tree, grace_s=8.0)]
        reap(str(self.run_dir), grace_s=0.0)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return left


def _worker_ports(index: int) -> list[str]:
    """Each node's worker processes take ports from a range of its own, above the bands
    ``loadtest.ports`` picks from (Ray's default, 10002-19999, would overlap them)."""
    low = 40000 + 2000 * index
    return [f"--min-worker-port={low}", f"--max-worker-port={low + 1999}"]


def replicas(status: dict, app: str = "loraserve") -> dict[str, int]:
    """RUNNING replicas per deployment, from ``serve status``."""
    deps = ((status.get("applications") or {}).get(app) or {}).get("deployments") or {}
    return {name: (d.get("replica_states") or {}).get("RUNNING", 0) for name, d in deps.items()}
