"""What the service says about itself: ``GET /v1/models`` (bases with their variants and
parity, adapters with their ``parent``) and ``GET /health`` (a tiny real inference per
configured (base, variant) through the path requests take)."""

from __future__ import annotations

import asyncio

from starlette.responses import Response

from models.errors import NotReady, VariantUnavailable
from models.spec import ModelSpec
from serve.errors import as_service_error
from serve.ingress.core import RouterCore
from serve.ingress.responses import error_response, json_response


async def variant_info(core: RouterCore, spec: ModelSpec, variant: str) -> dict:
    server = core.servers[(spec.id, variant)]
    try:
        info = await asyncio.wait_for(server.variant_info(), core.settings.limits.health_timeout_s)
    except Exception as exc:
        info = {"status": "unknown", "reason": as_service_error(exc).message}
    return {"name": variant, "default": variant == spec.default_variant, **info}


async def models(core: RouterCore) -> dict:
    """The OpenAI model list: bases (with aliases and variants), then adapters (``parent``)."""
    data = []
    variants = {}
    for spec in core.catalog.specs:
        variants[spec.id] = list(await asyncio.gather(
            *(variant_info(core, spec, v) for v in spec.variants)))
        data.append(
            {
                "id": spec.id,
                "object": "model",
                "created": core.created,
                "owned_by": "loraserve",
                "root": spec.hub_id or spec.id,
                "parent": None,
                "task": spec.task,
                "aliases": [n for n in spec.names() if n != spec.id],
                "default_variant": spec.default_variant,
                "variants": variants[spec.id],
            }
        )
    adapters = core.registry.adapters.values() if core.registry is not None else ()
    for ref in sorted(adapters, key=lambda r: r.name):
        data.append(
            {
                "id": ref.name,
                "object": "model",
                "created": ref.created,
                "owned_by": "loraserve",
                "root": ref.name,  # not the path: server paths stay with the admin API
                "parent": ref.base,
                "task": ref.task,
                "labels": list(ref.labels) or None,
                "default_variant": core.catalog.base(ref.base).default_variant,
                "variants": variants[ref.base],
            }
        )
    return {"object": "list", "data": data}


async def health(core: RouterCore) -> Response:
    """200 when every (base, variant) answers; a failed non-default variant is a reported
    state, not ill health."""
    timeout = core.settings.limits.health_timeout_s
    report: dict[str, str] = {}
    failed = []
    for spec in core.catalog.specs:
        for variant in spec.variants:
            key = f"{spec.id}@{variant}"
            try:
                await asyncio.wait_for(core.servers[(spec.id, variant)].health(), timeout)
                report[key] = "ok"
            except Exception as exc:
                report[key] = as_service_error(exc).message if not isinstance(
                    exc, asyncio.TimeoutError) else f"no answer within {timeout:g} s"
                # A variant that failed its load or parity is a known, reported state
                # (503 for its requests, reason in /v1/models); any other failure, or the
                # default variant failing, makes the service unhealthy.
                refused = isinstance(as_service_error(exc), VariantUnavailable)  # unwraps Ray's
                if not refused or variant == spec.default_variant:
                    failed.append(key)
    if failed:
        return error_response(NotReady(f"unhealthy: {', '.join(f'{k}: {report[k]}' for k in failed)}"))
    return json_response(200, {"status": "ok", "models": report})
