"""Start a local Ray, deploy a Serve config file, wait for it, tear everything down.

``make up`` (through ``loraserve up``) and the integration tests use the same code path, and it
mirrors what ``serve run deploy/<file>.yaml`` does: the config is a ``ServeDeploySchema``.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

DEFAULT_CONFIG = "deploy/local.yaml"


def load_config(path: str | Path) -> dict:
    with open(path) as fh:
        return yaml.safe_load(fh)


def app_args(config: dict, index: int = 0) -> dict:
    return config["applications"][index].get("args", {})


def start_ray(metrics_port: int | None, num_cpus: int | None = None) -> None:
    """A local, loopback-only Ray with no dashboard; metrics on a fixed port when given."""
    import ray

    kw = {}
    if metrics_port:
        kw["_metrics_export_port"] = metrics_port
    ray.init(
        namespace="serve",
        include_dashboard=False,
        num_cpus=num_cpus,
        _node_ip_address="127.0.0.1",
        configure_logging=True,
        logging_level="warning",
        **kw,
    )


def deploy(config: dict, timeout_s: float = 300.0) -> None:
    """Deploy every application of a Serve config and wait until all are RUNNING."""
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
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


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
