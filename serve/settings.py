"""Application settings: read once from the Serve config's ``args`` and passed down.

This module is the only place that reads the environment (for API keys named by ``*_env``
fields), so secrets need not sit in config files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.spec import ModelSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServedModel(ModelSpec):
    """A catalog entry: the model itself plus where and how it is served."""

    placement: Literal["colocated", "separate"] = Field(
        "colocated",
        description="`colocated`: the backend lives in the ingress replica (one hop, fastest). "
        "`separate`: a ModelServer deployment of its own, reached through a DeploymentHandle "
        "(for models that need their own resources).",
    )

    @model_validator(mode="after")
    def _generative_colocated(self) -> ServedModel:
        if self.task == "generate" and self.placement != "colocated":
            raise ValueError(
                f"model {self.id!r}: a generative model runs colocated (streaming through a "
                "separate deployment is not built yet)"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "deployment" in data:
            raise ValueError(
                "models[].deployment is not an application setting: a `separate` model's replicas, "
                "autoscaling and resources are Ray's own `deployments:` entry of the application, "
                "named ModelServer-<id>-<variant> (docs/configuration.md)"
            )
        return data


class LimitSettings(_Strict):
    """Bounds on every request (checked before a model sees it)."""

    max_body_bytes: int = Field(
        2_000_000, ge=1024, description="Larger request bodies get 413 before they are read."
    )
    max_inputs: int = Field(256, ge=1, description="Most inputs in one request.")
    request_timeout_s: float = Field(30.0, gt=0, description="Inference deadline (408 after).")
    health_timeout_s: float = Field(5.0, gt=0, description="Deadline of each /health probe.")


class AuthSettings(_Strict):
    """API keys for inference and for the admin routes (read from the environment)."""

    api_keys_env: str | None = Field(
        None,
        description="Name of an environment variable holding comma-separated inference API "
        "keys. Unset or empty: inference needs no key.",
    )
    admin_keys_env: str | None = Field(
        None,
        description="Name of an environment variable holding comma-separated admin keys for the "
        "adapter routes (load, unload, list). When set, those routes need an admin key and "
        "inference keys get 403. Unset or empty: they follow the inference key rule (local use).",
    )


class ConfigAdapter(_Strict):
    """An adapter declared in the config: registered at every start, pinned by default."""

    name: str = Field(description="Adapter name used in the `model` string.")
    base: str = Field(description="Catalog id of its base model.")
    path: str = Field(description="Directory inside an adapter store root (relative or absolute).")
    pinned: bool = Field(True, description="Never evicted; loaded when a replica starts.")


class AdapterSettings(_Strict):
    """LoRA adapter stores, the registry's persistence, and runtime updates."""

    stores: tuple[str, ...] = Field(
        ("adapters",),
        description="Adapter store roots. Admin loads must name a directory inside one of them. "
        "Relative paths are relative to $LORASERVE_HOME (default: the working directory of the "
        "process that starts the application). The first root is created when missing.",
    )
    state_dir: str = Field(
        ".loraserve/state",
        description="Where the adapter registry persists (adapters registered at runtime survive "
        "a restart). Relative like `stores`.",
    )
    preload: tuple[ConfigAdapter, ...] = Field((), description="Adapters registered at start.")
    runtime_updates: bool = Field(
        True, description="Allow POST /v1/load_lora_adapter and /v1/unload_lora_adapter."
    )
    sync_timeout_s: float = Field(
        5.0, gt=0, description="How long an admin call waits for every replica to apply it."
    )
    metrics_top_n: int = Field(
        20, ge=0, le=1000,
        description="Adapters that get their own label in request metrics; the rest are `other`.",
    )

    def resolve(self, raw: str) -> Path:
        return resolve_home_path(raw)

    def store_roots(self) -> list[Path]:
        roots = [self.resolve(r) for r in self.stores]
        if roots:
            roots[0].mkdir(parents=True, exist_ok=True)
        return roots

    def state_path(self) -> Path:
        return self.resolve(self.state_dir)


def resolve_home_path(raw: str) -> Path:
    """A configured path: relative ones are relative to $LORASERVE_HOME (else the cwd)."""
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = Path(os.environ.get("LORASERVE_HOME") or os.getcwd()) / path
    return path.resolve()


class VariantSettings(_Strict):
    """Where ONNX variants are built and cached (``models.variants``)."""

    cache_dir: str = Field(
        ".loraserve/variants",
        description="Variant cache, keyed by a content hash of checkpoint, build settings and "
        "tool versions. Relative like `adapters.stores`. `loraserve up` and `loraserve export` "
        "fill it before any replica starts; a replica that still finds its variant missing (a "
        "cluster node with its own disk) builds it first, under a file lock.",
    )

    def cache_path(self) -> Path:
        return resolve_home_path(self.cache_dir)


class AppSettings(_Strict):
    """Everything under ``args:`` of the application in deploy/*.yaml."""

    models: tuple[ServedModel, ...] = Field(min_length=1)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    adapters: AdapterSettings = Field(default_factory=AdapterSettings)
    variants: VariantSettings = Field(default_factory=VariantSettings)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        where = {
            "router": "Ray's own `deployments:` entry named Router (replicas, autoscaling_config, "
                      "max_ongoing_requests, ray_actor_options)",
            "ingress": "the environment Ray's processes start with (deploy/ray.env; "
                       "`serve deploy` cannot change it)",
            "metrics": "the metrics export port of the node (`ray start --metrics-export-port`, "
                       "`loraserve up --metrics-export-port`)",
        }
        for key in where.keys() & set(data if isinstance(data, dict) else ()):
            raise ValueError(f"args.{key} is not an application setting: it belongs to {where[key]}")
        return data

    @model_validator(mode="after")
    def _unique_names(self) -> AppSettings:
        seen: dict[str, str] = {}
        for m in self.models:
            for name in m.names():
                if name in seen:
                    raise ValueError(f"model name {name!r} is used by {seen[name]!r} and {m.id!r}")
                seen[name] = m.id
        return self

    @model_validator(mode="after")
    def _preload_bases(self) -> AppSettings:
        ids = {m.id for m in self.models}
        names = {n for m in self.models for n in m.names()}
        seen = set()
        for a in self.adapters.preload:
            if a.base not in ids:
                raise ValueError(f"adapter {a.name!r} names base {a.base!r}, not in models")
            if a.name in names or a.name in seen:
                raise ValueError(f"adapter name {a.name!r} is used twice")
            seen.add(a.name)
        return self

    def api_keys(self) -> frozenset[str]:
        return _keys(self.auth.api_keys_env)

    def admin_keys(self) -> frozenset[str]:
        return _keys(self.auth.admin_keys_env)


def load_config(path: str | Path) -> dict:
    """A Serve config file (``ServeDeploySchema`` as YAML), as a dict."""
    import yaml

    with open(path) as fh:
        return yaml.safe_load(fh)


def app_args(config: dict, index: int = 0) -> dict:
    """The ``args`` of one application of a Serve config: what ``AppSettings`` validates."""
    return config["applications"][index].get("args", {})


def deployment_options(config: dict, name: str, index: int = 0) -> dict:
    """Ray's own ``deployments:`` entry named ``name`` of application ``index`` ({} if none)."""
    for entry in config["applications"][index].get("deployments") or []:
        if entry.get("name") == name:
            return entry
    return {}


def replica_bounds(config: dict, name: str = "Router", index: int = 0) -> tuple[int, int]:
    """(min, max) replicas of a deployment as its config entry sets them (default 1, 1)."""
    entry = deployment_options(config, name, index)
    auto = entry.get("autoscaling_config") or {}
    if auto:
        return int(auto.get("min_replicas", 1)), int(auto.get("max_replicas", 1))
    n = entry.get("num_replicas", 1)
    return (1, 1) if n in (None, "auto") else (int(n), int(n))


def load_settings(path: str | Path, index: int = 0) -> AppSettings:
    """The one way to read settings: the ``args`` of application ``index`` of a config file."""
    return AppSettings.model_validate(app_args(load_config(path), index))


def _keys(env: str | None) -> frozenset[str]:
    if not env:
        return frozenset()
    raw = os.environ.get(env, "")
    return frozenset(k.strip() for k in raw.split(",") if k.strip())
