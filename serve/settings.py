"""Application settings: read once from the Serve config's ``args`` and passed down.

This module is the only place that reads the environment (for API keys named by ``*_env``
fields), so secrets need not sit in config files.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.spec import ModelSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeploymentSettings(_Strict):
    """Ray Serve knobs of one deployment; every deployment autoscales within these bounds."""

    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound.")
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas at start (default: min_replicas, at least 1)."
    )
    max_replicas: int = Field(1, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(
        32.0, gt=0, description="Autoscaler target of in-flight requests per replica."
    )
    max_ongoing_requests: int = Field(
        256, ge=1, description="Requests a replica accepts at once; more wait at the caller."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each replica.")
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> "DeploymentSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas {self.min_replicas} exceeds max_replicas {self.max_replicas}"
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError(
                f"initial_replicas {self.initial_replicas} is outside "
                f"{self.min_replicas}..{self.max_replicas}"
            )
        return self

    def autoscaling_config(self) -> dict[str, Any]:
        return {
            "min_replicas": self.min_replicas,
            "initial_replicas": self.initial_replicas or max(self.min_replicas, 1),
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }

    def deployment_options(self) -> dict[str, Any]:
        return {
            "autoscaling_config": self.autoscaling_config(),
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus},
        }


class ServedModel(ModelSpec):
    """A catalog entry: the model itself plus where and how it is served."""

    placement: Literal["colocated", "separate"] = Field(
        "colocated",
        description="`colocated`: the backend lives in the ingress replica (one hop, fastest). "
        "`separate`: a ModelServer deployment of its own, reached through a DeploymentHandle "
        "(for models that need their own resources).",
    )
    deployment: DeploymentSettings = Field(
        default_factory=DeploymentSettings,
        description="Replica settings when placement is `separate`.",
    )


class LimitSettings(_Strict):
    max_body_bytes: int = Field(
        2_000_000, ge=1024, description="Larger request bodies get 413 before they are read."
    )
    max_inputs: int = Field(256, ge=1, description="Most inputs in one request.")
    request_timeout_s: float = Field(30.0, gt=0, description="Inference deadline (408 after).")
    health_timeout_s: float = Field(5.0, gt=0, description="Deadline of each /health probe.")


class AuthSettings(_Strict):
    api_keys_env: str | None = Field(
        None,
        description="Name of an environment variable holding comma-separated inference API "
        "keys. Unset or empty: inference needs no key.",
    )


class MetricsSettings(_Strict):
    export_port: int = Field(
        8080, ge=1, le=65535, description="Ray's Prometheus metrics export port (`make up`)."
    )


class IngressSettings(_Strict):
    """How HTTP reaches the Router replicas (applied by ``loraserve up`` before Ray starts;
    with plain ``serve run``, set the equivalent RAY_SERVE_* variables yourself)."""

    mode: Literal["haproxy", "proxy"] = Field(
        "haproxy",
        description="`haproxy`: Ray's bundled HAProxy owns the public port and forwards to the "
        "replicas' direct-ingress ports (one hop, fastest). `proxy`: Ray's Python HTTP proxy.",
    )
    throughput_optimized: bool = Field(
        True, description="Set RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (direct ingress, gRPC handles)."
    )
    haproxy_stats_port: int = Field(8404, ge=1, le=65535, description="HAProxy stats page.")
    haproxy_metrics_port: int = Field(
        9101, ge=1, le=65535, description="HAProxy's Prometheus endpoint."
    )
    server_timeout_s: int = Field(
        60, ge=1, description="HAProxy's timeout waiting on a replica's answer."
    )
    drain_s: float = Field(
        2.0,
        ge=0,
        description="How long a stopping replica keeps its direct-ingress port draining "
        "(Ray's default is 30 s; locally a quick Ctrl-C matters more).",
    )
    direct_port_range: tuple[int, int] = Field(
        (30000, 30999), description="Ports the replicas' direct-ingress servers may take."
    )


class AppSettings(_Strict):
    """Everything under ``args:`` of the application in deploy/*.yaml."""

    models: tuple[ServedModel, ...] = Field(min_length=1)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    router: DeploymentSettings = Field(
        default_factory=DeploymentSettings, description="The ingress (Router) deployment."
    )

    @model_validator(mode="after")
    def _unique_names(self) -> "AppSettings":
        seen: dict[str, str] = {}
        for m in self.models:
            for name in m.names():
                if name in seen:
                    raise ValueError(f"model name {name!r} is used by {seen[name]!r} and {m.id!r}")
                seen[name] = m.id
        return self

    def api_keys(self) -> frozenset[str]:
        if not self.auth.api_keys_env:
            return frozenset()
        raw = os.environ.get(self.auth.api_keys_env, "")
        return frozenset(k.strip() for k in raw.split(",") if k.strip())
