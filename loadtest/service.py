"""The service under test: one way to configure, start, watch and stop it for a benchmark.

``bench_config`` is the only config patcher: it reads a Serve config (deploy/local.yaml) and the
node's env file (deploy/ray.env), picks free ports for everything the service listens on
(``loadtest.ports``), points the adapter registry at a temporary state dir (a benchmark never
touches ``.loraserve/state``) and applies a scenario's changes (Ray's ``deployments:`` options,
process-level variables, settings of the application or of every model), then validates the
result with ``AppSettings``. It returns a ``Launch``: what ``loraserve up`` is given.

``Server`` runs a server as a subprocess in its own process tree: ``loraserve up`` on such a
config (``Server.loraserve``) or any other command (the FastAPI recipe). It refuses to start
when the port already answers, logs to a file, polls ``GET /health``, and stops with SIGINT
(``loraserve up``'s Ctrl-C path, which shuts Ray down), then SIGKILL for anything of its tree
that outlived it. ``Server.cpu_s()`` is the CPU time of the whole tree (Ray's workers, HAProxy,
uvicorn's workers); ``replicas()`` counts the Router replica processes in it.

``OtherLoad`` measures what the rest of the machine used meanwhile (all busy CPU from
/proc/stat minus this benchmark's tree): on 2 cores one stray process halves the numbers, so
every figure records it and scenarios flag points above ``BUSY`` cores.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loadtest import ports
from loadtest.report import REPO
from serve.processes import cmdline, descendants, proc_stat

TICK = os.sysconf("SC_CLK_TCK")
BUSY = 0.10  # cores used by other processes above which a point counts as disturbed
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LORASERVE_HOME": str(REPO)}


# -- the config ----------------------------------------------------------------------------------
def merge(into: dict, patch: dict | None) -> dict:
    """Deep-merge ``patch`` into ``into`` (dicts merge, anything else replaces); returns ``into``."""
    for key, value in (patch or {}).items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


@dataclass
class Launch:
    """A Serve config, the node's process-level variables and the metrics export port."""

    config: dict
    ray_env: dict[str, str] = field(default_factory=dict)
    metrics_port: int = 8080

    @property
    def args(self) -> dict:
        return self.config["applications"][0]["args"]


def set_deployment(cfg: dict, name: str, options: dict) -> None:
    """Merge ``options`` into Ray's ``deployments:`` entry ``name`` (created when missing)."""
    entries = cfg["applications"][0].setdefault("deployments", [])
    for entry in entries:
        if entry.get("name") == name:
            merge(entry, options)
            return
    entries.append({"name": name, **copy.deepcopy(options)})


def bench_config(path: str | Path, state_dir: str | Path, *, replicas: int | None = None,
                 app: dict | None = None, model: dict | None = None,
                 model_id: str | None = None, deployments: dict[str, dict] | None = None,
                 ray_env: dict[str, str | None] | None = None,
                 env_file: str | Path = REPO / "deploy" / "ray.env") -> Launch:
    """``path``'s Serve config and ``env_file``'s variables with free ports, ``state_dir`` for the
    registry, and changes: ``replicas`` pins the Router (min = initial = max), ``deployments``
    merge into Ray's per-deployment options, ``ray_env`` into the variables (None removes one),
    ``app`` merges into the application's ``args``, ``model`` into every model entry (only
    ``model_id``'s when given)."""
    from serve.node import NodeEnv, load_env_file
    from serve.settings import AppSettings, app_args, load_config

    cfg = load_config(path)
    args = cfg["applications"][0].setdefault("args", {})
    merge(args, app)
    for m in args.get("models", []):
        if model_id in (None, m.get("id")):
            merge(m, model)
    for name, options in (deployments or {}).items():
        set_deployment(cfg, name, options)
    if replicas:
        set_deployment(cfg, "Router", {"autoscaling_config": {
            "min_replicas": replicas, "initial_replicas": replicas, "max_replicas": replicas}})
    http, export, stats, prom, fallback = ports.pick_ports(5)
    direct = ports.pick_block(100)
    grpc = ports.pick_block(100, avoid=[direct])
    cfg["http_options"] = {**cfg.get("http_options", {}), "host": "127.0.0.1", "port": http}
    merge(args, {"adapters": {"state_dir": str(state_dir)}})
    env = load_env_file(env_file)
    env.update({
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats), "RAY_SERVE_HAPROXY_METRICS_PORT": str(prom),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(direct[0]),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(direct[1]),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc[0]),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc[1]),
    })
    for key, value in (ray_env or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    NodeEnv.from_env(env)  # fail here, not in Ray
    AppSettings.model_validate(app_args(cfg))  # nor in a replica
    return Launch(cfg, env, export)


# -- processes -----------------------------------------------------------------------------------
def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system, incl. reaped children) of ``root`` and its descendants."""
    total = 0
    for pid in [root, *descendants(root)]:
        f = proc_stat(pid)
        if f:
            total += sum(int(x) for x in f[11:15])
    return total / TICK


def memory_mb(pid: int | str = "self") -> dict[str, float]:
    """VmRSS and its anonymous / file-backed parts, in MB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def _machine_busy_s() -> float:
    f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[:8])
    return (user + nice + system + irq + softirq + steal) / TICK


class OtherLoad:
    """Cores used by processes outside this benchmark's tree between ``start()`` and ``stop()``
    (hypervisor steal counts as other load: CPU the benchmark did not get)."""

    def __init__(self, root: int | None = None):
        self.root = root or os.getpid()

    def start(self) -> OtherLoad:
        self._t0, self._busy, self._ours = time.monotonic(), _machine_busy_s(), tree_cpu_s(self.root)
        return self

    def stop(self) -> float:
        wall = time.monotonic() - self._t0
        other = (_machine_busy_s() - self._busy) - (tree_cpu_s(self.root) - self._ours)
        return max(0.0, other) / wall if wall else 0.0


def wait_quiet(max_s: float, say=None) -> float:
    """Wait up to ``max_s`` for other processes to use under ``BUSY`` cores; the last share."""
    deadline = time.monotonic() + max_s
    w = OtherLoad().start()
    time.sleep(1.0)
    share = w.stop()
    if share > BUSY and say and max_s > 0:
        say(f"machine busy ({share:.2f} cores used by others); waiting up to {max_s:g} s")
    while share > BUSY and time.monotonic() < deadline:
        w = OtherLoad().start()
        time.sleep(2.0)
        share = w.stop()
    return share


# -- a server subprocess -------------------------------------------------------------------------
class Server:
    """One server process tree: ``start()`` -> ``wait_healthy()`` -> ``stop()`` (or ``with``)."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path,
                 env: dict[str, str] | None = None, app_name: str = "loraserve"):
        self.name, self.argv, self.port, self.log_path = name, argv, port, log_path
        self.env = {**os.environ, **OFFLINE, **(env or {})}
        self.replica_mark = f"ray::ServeReplica:{app_name}:Router"
        self.proc: subprocess.Popen | None = None
        self.launch: Launch | None = None  # config, env and metrics port of ``loraserve`` servers
        self.leftovers: list[str] = []  # processes of the tree that outlived the stop (killed)

    @classmethod
    def loraserve(cls, name: str, launch: Launch, workdir: Path, env: dict | None = None) -> Server:
        """``loraserve up`` on ``launch`` (written to ``workdir/<name>.yaml`` and ``.env``)."""
        cfg = launch.config
        path, env_path = workdir / f"{name}.yaml", workdir / f"{name}.env"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        env_path.write_text("".join(f"{k}={v}\n" for k, v in launch.ray_env.items()))
        server = cls(name, [sys.executable, "-m", "serve.cli", "up", "--config", str(path),
                            "--ray-env", str(env_path), "--metrics-export-port", str(launch.metrics_port)],
                     int(cfg["http_options"]["port"]), workdir / f"{name}.log", env,
                     cfg["applications"][0].get("name", "default"))
        server.launch = launch
        return server

    @property
    def metrics_url(self) -> str:
        """Ray's Prometheus endpoint of a ``loraserve`` server."""
        return f"http://127.0.0.1:{self.launch.metrics_port}/metrics"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self) -> Server:
        if not ports.port_free(self.port):
            raise RuntimeError(f"port {self.port} is taken; stop whatever runs there first")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=REPO)
        return self

    def wait_healthy(self, timeout_s: float = 300.0) -> float:
        """Poll ``/health`` until 200; the seconds it took. Raises if the process exits."""
        start = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log: "
                                   f"{self.log_path}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=10) as r:
                    if r.status == 200:
                        return time.monotonic() - start
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{self.name} not healthy after {timeout_s:g} s; log: {self.log_path}")
            time.sleep(1.0)

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def cpu_s(self) -> float:
        return tree_cpu_s(self.pid) if self.proc else 0.0

    def replicas(self) -> int | None:
        """Router replica processes of this service now (-1 when not running; None for a server
        that is not ``loraserve up``)."""
        if self.launch is None:
            return None
        if self.proc is None or self.proc.poll() is not None:
            return -1
        return sum(1 for pid in descendants(self.pid) if cmdline(pid).startswith(self.replica_mark))

    def replica_pids(self) -> list[int]:
        return sorted(pid for pid in descendants(self.pid) if cmdline(pid).startswith(self.replica_mark))

    def stop(self, timeout_s: float = 90.0) -> None:
        """SIGINT, wait, SIGKILL; then kill what of its tree outlived it (same pid and start)."""
        if self.proc is None:
            return
        family = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.leftovers.append(f"{self.name} itself (no exit {timeout_s:g} s after SIGINT)")
                self.proc.kill()
                self.proc.wait()
        time.sleep(1.0)
        for pid, started in family.items():
            f = proc_stat(pid)
            if f and f[19] == started and f[0] not in ("Z", "X"):
                self.leftovers.append(f"{pid} {cmdline(pid)[:100]}")
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def workdir(prefix: str) -> Path:
    """A temporary folder for a run's configs, logs and registry state."""
    return Path(tempfile.mkdtemp(prefix=f"loadtest-{prefix}-"))
