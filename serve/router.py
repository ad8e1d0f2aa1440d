"""The Router: the ingress role (FastAPI through ``serve.ingress``).

Per request: API key (before the body), content type, bounded body read, pydantic validation,
``Target`` parse and resolution against the catalog and the adapter registry (a local view kept
current by a watch; no hop), dispatch to the ModelServer of (base, variant) -- in this replica
when co-located, through a DeploymentHandle when separate (adapter requests then carry the
adapter as multiplexed model id) -- and one place that turns any failure into the OpenAI error
envelope and counts it.

Admin routes (load, unload, list adapters) validate in this replica, write to the registry
actor, and return once every live replica has applied the change (or say which have not).

No ``from __future__ import annotations`` here: ``serve.ingress`` re-wraps the route methods and
FastAPI must see real annotation objects (``Request``), not strings.
"""


import asyncio
import functools
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from models.adapters import AdapterRef
from models.backend import create_backend
from models.catalog import Catalog, Resolved
from models.errors import (
    InvalidRequest,
    NotFound,
    NotReady,
    ServiceError,
    TooManyInputs,
    VariantUnavailable,
)
from models.target import Target
from serve.adapter_admin import AdapterInspector
from serve.deployments import RemoteModelServer, start_registry
from serve.errors import Forbidden, MethodNotAllowed, as_service_error, error_body
from serve.http_io import check_admin_key, check_api_key, parse, read_json
from serve.metrics import UNKNOWN_MODEL, AdapterLabels, ModelMetrics, ServiceMetrics
from serve.model_server import ModelServer
from serve.registry import RegistryClient
from serve.schemas import (
    ClassifyRequest,
    EmbeddingsRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    classify_response,
    embeddings_response,
)
from serve.settings import AppSettings

log = logging.getLogger("loraserve")

_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    """Unique per replica process and cheap (uuid4 costs a syscall per request)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def serve_request_id() -> str:
    """The id Serve already gave this request (and echoes as ``x-request-id``)."""
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id or new_request_id()


app = FastAPI(title="loraserve", docs_url=None, redoc_url=None)
JSON = "application/json"


def _json(status: int, body: dict, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, headers, media_type=JSON
    )


def _error(err: ServiceError, request_id: str | None = None) -> Response:
    status, body, headers = error_body(err, request_id or serve_request_id())
    return _json(status, body, headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code == 405:
        return _error(MethodNotAllowed(f"method {request.method} is not allowed on {request.url.path}"))
    return _error(NotFound(f"no route {request.method} {request.url.path}", code="route_not_found"))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return _error(InvalidRequest(f"invalid request: {exc.errors()[0].get('msg', 'invalid')}"))


class RouterCore:
    """The ingress logic, independent of Ray: the deployment below is a thin shell over it."""

    def __init__(
        self,
        settings: AppSettings,
        servers: dict[tuple[str, str], object],
        metrics=None,
        request_id: Callable[[], str] = new_request_id,
        registry: RegistryClient | None = None,
    ):
        self.settings = settings
        self.request_id = request_id
        self.catalog = Catalog(settings.models)
        self.servers = servers
        self.keys = settings.api_keys()
        self.admin_keys = settings.admin_keys()
        self.metrics = metrics
        self.registry = registry
        self.inspector = AdapterInspector(self.catalog, settings.adapters.store_roots())
        self.created = int(time.time())

    async def resolve(self, model: str) -> Resolved:
        """The ``model`` string against the catalog and the registry's adapters."""
        target = Target.parse(model)
        adapters: dict[str, AdapterRef] = {}
        name = target.adapter or (None if self.catalog.base(target.head) else target.head)
        if name is not None and self.registry is not None:
            ref = await self.registry.lookup(name)
            if ref is not None:
                adapters[name] = ref
        return self.catalog.resolve(target, adapters)

    async def handle(
        self, request: Request, route: str, schema, run: Callable[..., Awaitable[dict]]
    ) -> Response:
        rid = self.request_id()
        start = time.perf_counter()
        model = UNKNOWN_MODEL
        adapter = None
        code = None
        try:
            check_api_key(request, self.keys)
            payload = parse(schema, await read_json(request, self.settings.limits.max_body_bytes))
            inputs = payload.inputs()
            if len(inputs) > self.settings.limits.max_inputs:
                raise TooManyInputs(
                    f"{len(inputs)} inputs in one request; the limit is "
                    f"{self.settings.limits.max_inputs}",
                    param="input",
                )
            resolved = await self.resolve(payload.model)
            model = resolved.spec.id
            adapter = resolved.adapter.name if resolved.adapter is not None else None
            server = self.servers[(resolved.spec.id, resolved.variant)]
            body = await run(server, payload, inputs, resolved, rid)
            response = _json(200, body)
        except Exception as exc:
            err = as_service_error(exc)
            code = err.code
            response = _error(err, rid)
        if self.metrics is not None:
            latency_ms = (time.perf_counter() - start) * 1000
            # recorded once the response is on its way: Ray's metric calls are not free
            asyncio.get_running_loop().call_soon(
                self.metrics.request, route, model, response.status_code, latency_ms, code, adapter
            )
        return response

    async def embeddings(self, server, req: EmbeddingsRequest, inputs, resolved: Resolved, rid: str):
        out = await server.embed(
            inputs,
            truncate=req.truncate,
            dimensions=req.dimensions,
            timeout_s=self.settings.limits.request_timeout_s,
            adapter=resolved.adapter,
        )
        return embeddings_response(req.model, out.values, req.encoding_format, out.tokens)

    async def classify(self, server, req: ClassifyRequest, inputs, resolved: Resolved, rid: str):
        out = await server.classify(
            inputs, truncate=req.truncate, timeout_s=self.settings.limits.request_timeout_s,
            adapter=resolved.adapter,
        )
        return classify_response(rid, int(time.time()), req.model, out.values, out.labels, out.tokens)

    async def variant_info(self, spec, variant: str) -> dict:
        server = self.servers[(spec.id, variant)]
        try:
            info = server.variant_info()
            if asyncio.iscoroutine(info):
                info = await asyncio.wait_for(info, self.settings.limits.health_timeout_s)
        except Exception as exc:
            info = {"status": "unknown", "reason": as_service_error(exc).message}
        return {"name": variant, "default": variant == spec.default_variant, **info}

    async def models(self) -> dict:
        data = []
        variants = {}
        for spec in self.catalog.specs:
            variants[spec.id] = list(await asyncio.gather(
                *(self.variant_info(spec, v) for v in spec.variants)))
            data.append(
                {
                    "id": spec.id,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "loraserve",
                    "root": spec.hub_id or spec.id,
                    "parent": None,
                    "task": spec.task,
                    "aliases": [n for n in spec.names() if n != spec.id],
                    "default_variant": spec.default_variant,
                    "variants": variants[spec.id],
                }
            )
        adapters = self.registry.adapters.values() if self.registry is not None else ()
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
                    "default_variant": self.catalog.base(ref.base).default_variant,
                    "variants": variants[ref.base],
                }
            )
        return {"object": "list", "data": data}

    # -- admin -------------------------------------------------------------------------------
    async def admin(self, request: Request, action: str, schema, run) -> Response:
        rid = self.request_id()
        try:
            check_admin_key(request, self.admin_keys, self.keys)
            if self.registry is None:
                raise NotReady("the adapter registry is not available")
            payload = None
            if schema is not None:
                if not self.settings.adapters.runtime_updates:
                    raise Forbidden("runtime adapter updates are disabled in this service's config")
                payload = parse(schema, await read_json(request, self.settings.limits.max_body_bytes))
            response = _json(200, await run(payload))
        except Exception as exc:
            err = as_service_error(exc)
            response = _error(err, rid)
            if self.metrics is not None:
                self.metrics.admin(action, err.code)
            return response
        if self.metrics is not None:
            self.metrics.admin(action, None)
        return response

    async def load_adapter(self, req: LoadAdapterRequest) -> dict:
        loop = asyncio.get_running_loop()
        ref = await loop.run_in_executor(
            None, lambda: self.inspector.inspect(
                req.lora_name, req.lora_path, req.base_model_name, pinned=req.pinned
            )
        )
        version = await self.registry.actor.register.remote(ref.to_dict(), req.replace)
        sync = await self._synced(version)
        log.info("adapter %s registered on %s from %s (%s)", ref.name, ref.base, ref.path, sync)
        return {"object": "adapter", **_adapter_view(ref), "sync": sync}

    async def unload_adapter(self, req: UnloadAdapterRequest) -> dict:
        version = await self.registry.actor.unregister.remote(req.lora_name)
        sync = await self._synced(version)
        log.info("adapter %s unregistered (%s)", req.lora_name, sync)
        return {"object": "adapter", "name": req.lora_name, "deleted": True, "sync": sync}

    async def list_adapters(self, _payload=None) -> dict:
        rows = await self.registry.actor.describe.remote()
        return {"object": "list", "data": [{"object": "adapter", **r} for r in rows]}

    async def _synced(self, version: int) -> dict:
        sync = await self.registry.actor.wait_synced.remote(
            version, self.settings.adapters.sync_timeout_s
        )
        if self.registry.version < version:  # apply it here now rather than on the next watch
            await self.registry.refresh()
        return sync

    async def health(self) -> Response:
        timeout = self.settings.limits.health_timeout_s
        report: dict[str, str] = {}
        failed = []
        for spec in self.catalog.specs:
            for variant in spec.variants:
                key = f"{spec.id}@{variant}"
                try:
                    await asyncio.wait_for(self.servers[(spec.id, variant)].health(), timeout)
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
            return _error(NotReady(f"unhealthy: {', '.join(f'{k}: {report[k]}' for k in failed)}"))
        return _json(200, {"status": "ok", "models": report})


def _adapter_view(ref: AdapterRef) -> dict:
    return {**ref.to_dict(), "labels": list(ref.labels) or None}


def build_servers(
    settings: AppSettings, handles: dict, on_residency: Callable[[], None] | None = None
) -> dict[tuple[str, str], object]:
    servers: dict[tuple[str, str], object] = {}
    roots = settings.adapters.store_roots()
    factory = functools.partial(create_backend, variant_cache=settings.variants.cache_path())
    for spec in settings.models:
        for variant in spec.variants:
            if spec.placement == "colocated":
                observer = ModelMetrics(spec.id, variant)
                servers[(spec.id, variant)] = ModelServer(
                    spec, variant, observer=observer, store_roots=roots, on_residency=on_residency,
                    backend_factory=factory,
                ).load()
            else:
                handle = handles[f"{spec.id}@{variant}"]
                servers[(spec.id, variant)] = RemoteModelServer(spec, variant, handle)
    return servers


@serve.deployment
@serve.ingress(app)
class Router:
    async def __init__(self, settings: dict, handles: dict | None = None):
        parsed = AppSettings.model_validate(settings)
        self._client: RegistryClient | None = None
        servers = build_servers(parsed, handles or {}, on_residency=self._residency)
        metrics = ServiceMetrics(AdapterLabels(
            parsed.adapters.metrics_top_n, pinned=tuple(a.name for a in parsed.adapters.preload)
        ))
        self.core = RouterCore(parsed, servers, metrics, serve_request_id)
        self._client = await start_registry(parsed.adapters, servers, self.core.inspector)
        self.core.registry = self._client
        await self._client.start()

    def _residency(self) -> None:
        if self._client is not None:
            self._client.residency_changed()

    def __del__(self):
        if getattr(self, "_client", None) is not None:
            self._client.close()

    @app.get("/health")
    async def health(self) -> Response:
        return await self.core.health()

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            check_api_key(request, self.core.keys)
        except ServiceError as err:
            return _error(err)
        return _json(200, await self.core.models())

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        return await self.core.handle(request, "embeddings", EmbeddingsRequest, self.core.embeddings)

    @app.post("/v1/classify")
    async def classify(self, request: Request) -> Response:
        return await self.core.handle(request, "classify", ClassifyRequest, self.core.classify)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, request: Request) -> Response:
        return await self.core.admin(request, "load", LoadAdapterRequest, self.core.load_adapter)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, request: Request) -> Response:
        return await self.core.admin(request, "unload", UnloadAdapterRequest, self.core.unload_adapter)

    @app.get("/v1/adapters")
    async def adapters(self, request: Request) -> Response:
        return await self.core.admin(request, "list", None, self.core.list_adapters)

    def check_health(self) -> None:
        for key, server in self.core.servers.items():
            if isinstance(server, ModelServer):
                server.report()
            if not server.alive():
                raise RuntimeError(f"model server {key} is not running")
