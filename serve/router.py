"""The Router: the ingress role (FastAPI through ``serve.ingress``).

Per request: API key (before the body), content type, bounded body read, pydantic validation,
``Target`` parse and catalog resolution, dispatch to the ModelServer of (base, variant) -- in this
replica when co-located, through a DeploymentHandle when separate -- and one place that turns
any failure into the OpenAI error envelope and counts it.

No ``from __future__ import annotations`` here: ``serve.ingress`` re-wraps the route methods and
FastAPI must see real annotation objects (``Request``), not strings.
"""


import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from models.catalog import Catalog, Resolved
from models.errors import InvalidRequest, NotFound, NotReady, ServiceError, TooManyInputs
from models.target import Target
from serve.deployments import RemoteModelServer
from serve.errors import MethodNotAllowed, as_service_error, error_body
from serve.http_io import check_api_key, parse, read_json
from serve.metrics import UNKNOWN_MODEL, ModelMetrics, ServiceMetrics
from serve.model_server import ModelServer
from serve.schemas import ClassifyRequest, EmbeddingsRequest, classify_response, embeddings_response
from serve.settings import AppSettings

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
    ):
        self.settings = settings
        self.request_id = request_id
        self.catalog = Catalog(settings.models)
        self.servers = servers
        self.keys = settings.api_keys()
        self.metrics = metrics
        self.created = int(time.time())

    async def handle(
        self, request: Request, route: str, schema, run: Callable[..., Awaitable[dict]]
    ) -> Response:
        rid = self.request_id()
        start = time.perf_counter()
        model = UNKNOWN_MODEL
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
            resolved = self.catalog.resolve(Target.parse(payload.model))
            model = resolved.spec.id
            server = self.servers[(resolved.spec.id, resolved.variant)]
            body = await run(server, payload, inputs, resolved, rid)
            response = _json(200, body)
        except Exception as exc:
            err = as_service_error(exc)
            code = err.code
            response = _error(err, rid)
        if self.metrics is not None:
            latency_ms = (time.perf_counter() - start) * 1000
            self.metrics.request(route, model, response.status_code, latency_ms, code)
        return response

    async def embeddings(self, server, req: EmbeddingsRequest, inputs, resolved: Resolved, rid: str):
        out = await server.embed(
            inputs,
            truncate=req.truncate,
            dimensions=req.dimensions,
            timeout_s=self.settings.limits.request_timeout_s,
        )
        return embeddings_response(req.model, out.values, req.encoding_format, out.tokens)

    async def classify(self, server, req: ClassifyRequest, inputs, resolved: Resolved, rid: str):
        out = await server.classify(
            inputs, truncate=req.truncate, timeout_s=self.settings.limits.request_timeout_s
        )
        return classify_response(rid, int(time.time()), req.model, out.values, out.labels, out.tokens)

    def models(self) -> dict:
        data = []
        for spec in self.catalog.specs:
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
                    "variants": [
                        {"name": v, "default": v == spec.default_variant, "status": "serving",
                         "parity": {"reference": True} if v == "torch" else None}
                        for v in spec.variants
                    ],
                }
            )
        return {"object": "list", "data": data}

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
                except Exception as exc:  # any failure makes the service unhealthy
                    report[key] = as_service_error(exc).message if not isinstance(
                        exc, asyncio.TimeoutError) else f"no answer within {timeout:g} s"
                    failed.append(key)
        if failed:
            return _error(NotReady(f"unhealthy: {', '.join(f'{k}: {report[k]}' for k in failed)}"))
        return _json(200, {"status": "ok", "models": report})


def build_servers(settings: AppSettings, handles: dict) -> dict[tuple[str, str], object]:
    servers: dict[tuple[str, str], object] = {}
    for spec in settings.models:
        for variant in spec.variants:
            if spec.placement == "colocated":
                observer = ModelMetrics(spec.id, variant)
                servers[(spec.id, variant)] = ModelServer(spec, variant, observer=observer).load()
            else:
                handle = handles[f"{spec.id}@{variant}"]
                servers[(spec.id, variant)] = RemoteModelServer(spec, variant, handle)
    return servers


@serve.deployment
@serve.ingress(app)
class Router:
    def __init__(self, settings: dict, handles: dict | None = None):
        parsed = AppSettings.model_validate(settings)
        self.core = RouterCore(
            parsed, build_servers(parsed, handles or {}), ServiceMetrics(), serve_request_id
        )

    @app.get("/health")
    async def health(self) -> Response:
        return await self.core.health()

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            check_api_key(request, self.core.keys)
        except ServiceError as err:
            return _error(err)
        return _json(200, self.core.models())

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        return await self.core.handle(request, "embeddings", EmbeddingsRequest, self.core.embeddings)

    @app.post("/v1/classify")
    async def classify(self, request: Request) -> Response:
        return await self.core.handle(request, "classify", ClassifyRequest, self.core.classify)

    def check_health(self) -> None:
        for key, server in self.core.servers.items():
            if not server.alive():
                raise RuntimeError(f"model server {key} is not running")
