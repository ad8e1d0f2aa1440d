"""The Router deployment: HTTP routes only (FastAPI, mounted with Ray's ``@serve.ingress``).

Each route hands the request to the Ray-free logic: ``serve.ingress.core`` (inference),
``serve.ingress.admin`` (adapter admin), ``serve.ingress.listing`` (models, health). FastAPI's
own errors (unknown route, wrong method, its 422) are mapped to the error envelope here.

The two hot routes (``POST /v1/embeddings``, ``/v1/classify``) skip FastAPI altogether: the app's
``__call__`` hands them to their handler before FastAPI's middleware stack (error, telemetry,
body-limit and exit-stack middleware) and router. They take the raw request anyway (the body
limit, auth and errors are theirs). With HAProxy's no-disconnect-watch header
(``serve.haproxy``) this cut the event loop's CPU per request at c1 by 17-21% on the ONNX
variants (``path-budget-c1-before.md`` vs ``path-budget-c1.md``). Other methods on those paths
still go through FastAPI (405 in the envelope). They reach the Router as Ray's own class-based
routes do (the replica context's servable object), kept on the app after the first request.

No ``from __future__ import annotations`` here: Ray's ``@serve.ingress`` re-wraps the route methods and
FastAPI must see real annotation objects (``Request``), not strings.
"""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Route

from models.errors import InvalidRequest, MethodNotAllowed, NotFound, ServiceError
from serve.autoscaling import ADAPTER_LOADS_PER_S, LoadRate
from serve.ingress import HOT_PATHS, admin, generation, listing
from serve.ingress.core import RouterCore
from serve.ingress.http_io import check_api_key
from serve.ingress.responses import error_response, json_response, serve_request_id
from serve.ingress.schemas import ClassifyRequest, EmbeddingsRequest, LoadAdapterRequest, UnloadAdapterRequest
from serve.metrics import AdapterLabels, ServiceMetrics
from serve.registry.client import RegistryClient
from serve.server.wiring import build_servers, start_registry
from serve.settings import AppSettings


class _App(FastAPI):
    """FastAPI with the hot routes dispatched before its middleware (module docstring)."""

    hot: dict = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.hot.get(scope["path"])
            if handler is not None and not scope.get("root_path"):
                scope["app"] = self
                response = await handler(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


app = _App(title="loraserve", docs_url=None, redoc_url=None)


def _core(request: Request) -> RouterCore:
    state = request.app.state
    core = getattr(state, "core", None)
    if core is None:
        core = state.core = serve.get_replica_context().servable_object.core
    return core


async def _embeddings(request: Request) -> Response:
    core = _core(request)
    return await core.handle(request, "embeddings", EmbeddingsRequest, core.embeddings)


async def _classify(request: Request) -> Response:
    core = _core(request)
    return await core.handle(request, "classify", ClassifyRequest, core.classify)


_App.hot = dict(zip(HOT_PATHS, (_embeddings, _classify)))
app.router.routes[:0] = [Route(path, handler, methods=["POST"]) for path, handler in _App.hot.items()]


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code == 405:
        return error_response(MethodNotAllowed(f"method {request.method} is not allowed on {request.url.path}"))
    return error_response(NotFound(f"no route {request.method} {request.url.path}", code="route_not_found"))


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    return error_response(InvalidRequest(f"invalid request: {exc.errors()[0].get('msg', 'invalid')}"))


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
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
        self._load_rate = LoadRate()
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
        return await listing.health(self.core)

    @app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        try:
            check_api_key(request, self.core.keys)
        except ServiceError as err:
            return error_response(err)
        return json_response(200, await listing.models(self.core))

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await generation.completions(self.core, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await generation.completions(self.core, request, chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, request: Request) -> Response:
        return await admin.admin(self.core, request, "load", LoadAdapterRequest, admin.load_adapter)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, request: Request) -> Response:
        return await admin.admin(self.core, request, "unload", UnloadAdapterRequest, admin.unload_adapter)

    @app.get("/v1/adapters")
    async def adapters(self, request: Request) -> Response:
        return await admin.admin(self.core, request, "list", None, admin.list_adapters)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Adapter pressure of the co-located models (``serve.autoscaling``)."""
        loads = sum(s.adapters.loads for s in self.core.servers.values() if hasattr(s, "adapters"))
        return {ADAPTER_LOADS_PER_S: self._load_rate(loads)}

    def check_health(self) -> None:
        for key, server in self.core.servers.items():
            server.report()
            if not server.alive():
                raise RuntimeError(f"model server {key} is not running")
