"""The application builder named in deploy/*.yaml: ``import_path: serve.app:build_app``.

``args`` of the config are the ``AppSettings``. Co-located models load inside the Router's
replicas; each (base, variant) with placement ``separate`` becomes a ModelServer deployment whose
handle the Router receives. Replicas, autoscaling, resources and ``max_ongoing_requests`` are
Ray's own: the config's ``deployments:`` entries (``Router``, ``ModelServer-<id>-<variant>``)
override the code's defaults (one replica, one CPU, 256 requests at once).
"""

from __future__ import annotations

from ray.serve import Application

from serve.ingress.app import Router
from serve.server.deployment import ModelServerDeployment, deployment_name
from serve.settings import AppSettings


def build_app(args: dict) -> Application:
    settings = AppSettings.model_validate(args)
    handles = {}
    for spec in settings.models:
        if spec.placement != "separate":
            continue
        for variant in spec.variants:
            handles[f"{spec.id}@{variant}"] = ModelServerDeployment.options(
                name=deployment_name(spec.id, variant)
            ).bind(
                spec.model_dump(mode="json"), variant, settings.adapters.model_dump(mode="json"),
                settings.variants.model_dump(mode="json"),
            )
    return Router.bind(
        settings.model_dump(mode="json"), handles
    )
