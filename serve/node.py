"""The process-level switches of a Ray node: what Ray's processes read from their environment
when they start, kept in an env file (``deploy/ray.env``) that every way of starting shares.

- ``loraserve up`` / ``make up`` reads the file and sets the variables before ``ray.init``.
- ``ray start`` (a cluster) and ``serve run``: the shell exports the file first
  (``set -a; . deploy/ray.env; set +a``); ``serve deploy`` cannot change them on a running
  cluster, which is why they are not in the Serve config.
- KubeRay: the manifests in ``k8s/`` carry the same variables as container ``env``.

A misspelled variable would be ignored by Ray without a word: ``check_env`` refuses names Ray
2.60 does not read, with the closest one it does.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
from functools import lru_cache
from pathlib import Path

DEFAULT_ENV_FILE = "deploy/ray.env"
# Ray 2.60's defaults (ray/serve/_private/constants.py) for the ports a start must find free.
_DEFAULTS = {
    "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "30000",
    "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "31000",
    "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": "40000",
    "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": "41000",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": "8500",
    "RAY_SERVE_HAPROXY_STATS_PORT": "8404",
    "RAY_SERVE_HAPROXY_METRICS_PORT": "9101",
    "RAY_SERVE_ENABLE_HA_PROXY": "0",
}
# Names outside RAY_SERVE_* that a node's environment may carry.
# (every other RAY_* name is Ray core's, read in C++ too, and trusted)
_OTHER_KNOWN = {"LORASERVE_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS",
                "LORASERVE_HAPROXY_BINARY", "LORASERVE_AUX_HOST"}
HAPROXY_SCRIPT = "loraserve-haproxy"  # serve/haproxy.py's console script


class StartupError(RuntimeError):
    """An expected reason not to start (a bad setting, ports taken): printed as one line."""


def load_env_file(path: str | Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, blank lines, optional ``export``) as a dict."""
    env: dict[str, str] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise StartupError(f"{path}:{n}: expected KEY=VALUE, got {line!r}")
        env[key.strip()] = value.strip().strip("'\"")
    return env


@lru_cache(maxsize=1)
def ray_serve_env_names() -> frozenset[str]:
    """Every RAY_SERVE_* variable the installed Ray Serve reads (found in its source)."""
    spec = importlib.util.find_spec("ray.serve")
    root = Path(spec.origin).parent if spec and spec.origin else None
    names: set[str] = set()
    for path in root.rglob("*.py") if root else ():
        names.update(re.findall(r"[\"'](RAY_SERVE_[A-Z0-9_]+)[\"']", path.read_text(errors="replace")))
    return frozenset(names)


def check_env(env: dict[str, str], where: str = DEFAULT_ENV_FILE) -> None:
    """Refuse variables Ray would silently ignore (a typo) or that are not Ray's or ours."""
    known = ray_serve_env_names() | _OTHER_KNOWN
    bad = []
    for key in sorted(env):
        if key in known or (key.startswith("RAY_") and not key.startswith("RAY_SERVE_")):
            continue  # RAY_* core settings are many and read in C++; trust them
        near = difflib.get_close_matches(key, sorted(known), n=1)
        bad.append(key + (f" (did you mean {near[0]}?)" if near else ""))
    if bad:
        raise StartupError(f"{where}: variable(s) Ray Serve {_ray_version()} does not read: {', '.join(bad)}")


def _ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


class NodeEnv:
    """One node's environment: the variables, and what the service needs to know of them."""

    def __init__(self, env: dict[str, str]):
        self.env = dict(env)

    @classmethod
    def from_file(cls, path: str | Path = DEFAULT_ENV_FILE, overrides: dict[str, str] | None = None) -> NodeEnv:
        env = load_env_file(path)
        env.update(overrides or {})
        check_env(env, str(path))
        return cls(env)

    @classmethod
    def from_env(cls, env: dict[str, str], where: str = "the environment") -> NodeEnv:
        check_env(env, where)
        return cls(env)

    def get(self, key: str) -> str:
        return self.env.get(key, _DEFAULTS.get(key, ""))

    def port(self, key: str) -> int:
        return int(self.get(key))

    @property
    def haproxy(self) -> bool:
        return self.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"

    def port_ranges(self) -> list[tuple[int, int, str]]:
        return [
            (self.port("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"),
             self.port("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"), "direct-ingress range"),
            (self.port("RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"),
             self.port("RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"), "gRPC range"),
        ]

    def single_ports(self) -> list[tuple[int, str]]:
        ports = [(self.port("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"), "Ray's fallback proxy")]
        if self.haproxy:
            ports += [(self.port("RAY_SERVE_HAPROXY_STATS_PORT"), "HAProxy stats"),
                      (self.port("RAY_SERVE_HAPROXY_METRICS_PORT"), "HAProxy metrics")]
        return ports

    def haproxy_wrapper(self) -> dict[str, str]:
        """Ray runs ``loraserve-haproxy`` (serve/haproxy.py) as its HAProxy binary; a binary this
        environment named stays the real one (``LORASERVE_HAPROXY_BINARY``)."""
        script = Path(sys.executable).with_name(HAPROXY_SCRIPT)
        if not self.haproxy or not script.exists():
            return {}
        env = {"RAY_SERVE_HAPROXY_BINARY_PATH": str(script)}
        own = self.env.get("RAY_SERVE_HAPROXY_BINARY_PATH")
        if own and Path(own).name != HAPROXY_SCRIPT:
            env["LORASERVE_HAPROXY_BINARY"] = own
        return env

    def for_local_run(self, run_dir: Path, home: str) -> dict[str, str]:
        """The variables ``loraserve up`` sets: the file's, HAProxy's files in this run's own
        folder, and LORASERVE_HOME (relative adapter and cache paths mean the same everywhere)."""
        env = {"RAY_USAGE_STATS_ENABLED": "0", **self.env, "LORASERVE_HOME": home}
        if self.haproxy:
            env.update(
                RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=str(run_dir / "haproxy.cfg"),
                RAY_SERVE_HAPROXY_SOCKET_PATH=str(run_dir / "admin.sock"),
                RAY_SERVE_HAPROXY_SERVER_STATE_BASE=str(run_dir),
                RAY_SERVE_HAPROXY_SERVER_STATE_FILE=str(run_dir / "server-state"),
                **self.haproxy_wrapper(),
            )
        return env
