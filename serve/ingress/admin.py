"""The admin plane of the ingress: register (``POST /v1/load_lora_adapter``), unregister
(``POST /v1/unload_lora_adapter``) and list (``GET /v1/adapters``) adapters.

Admin key checked before the body is read; the adapter validated in this replica
(``models.registration``) before anything is registered; the change written to the registry and
the call answered once every live replica has applied it (or saying which have not).
"""

from __future__ import annotations

import asyncio
import logging

from starlette.requests import Request
from starlette.responses import Response

from models.adapters.identity import AdapterRef
from models.errors import Forbidden, NotReady
from serve.errors import as_service_error
from serve.ingress.core import RouterCore
from serve.ingress.http_io import check_admin_key, parse, read_json
from serve.ingress.responses import error_response, json_response
from serve.ingress.schemas import LoadAdapterRequest, UnloadAdapterRequest

log = logging.getLogger("loraserve")


async def admin(core: RouterCore, request: Request, action: str, schema, run) -> Response:
    """Authenticate, check that runtime updates are allowed, parse, run, count the call."""
    rid = core.request_id()
    try:
        check_admin_key(request, core.admin_keys, core.keys)
        if core.registry is None:
            raise NotReady("the adapter registry is not available")
        payload = None
        if schema is not None:
            if not core.settings.adapters.runtime_updates:
                raise Forbidden("runtime adapter updates are disabled in this service's config")
            payload = parse(schema, await read_json(request, core.settings.limits.max_body_bytes))
        response = json_response(200, await run(core, payload))
    except Exception as exc:
        err = as_service_error(exc)
        response = error_response(err, rid)
        if core.metrics is not None:
            core.metrics.admin(action, err.code)
        return response
    if core.metrics is not None:
        core.metrics.admin(action, None)
    return response


async def load_adapter(core: RouterCore, req: LoadAdapterRequest) -> dict:
    loop = asyncio.get_running_loop()
    ref = await loop.run_in_executor(
        None, lambda: core.inspector.inspect(
            req.lora_name, req.lora_path, req.base_model_name, pinned=req.pinned
        )
    )
    version = await core.registry.register(ref, req.replace)
    sync = await core.registry.synced(version, core.settings.adapters.sync_timeout_s)
    log.info("adapter %s registered on %s from %s (%s)", ref.name, ref.base, ref.path, sync)
    return {"object": "adapter", **_adapter_view(ref), "sync": sync}


async def unload_adapter(core: RouterCore, req: UnloadAdapterRequest) -> dict:
    version = await core.registry.unregister(req.lora_name)
    sync = await core.registry.synced(version, core.settings.adapters.sync_timeout_s)
    log.info("adapter %s unregistered (%s)", req.lora_name, sync)
    return {"object": "adapter", "name": req.lora_name, "deleted": True, "sync": sync}


async def list_adapters(core: RouterCore, _payload=None) -> dict:
    rows = await core.registry.describe()
    return {"object": "list", "data": [{"object": "adapter", **r} for r in rows]}


def _adapter_view(ref: AdapterRef) -> dict:
    return {**ref.to_dict(), "labels": list(ref.labels) or None}
