"""The inference path of the ingress, independent of Ray: ``RouterCore.handle`` reads one
request (API key before the body, content type, bounded body, pydantic validation, input count),
resolves its ``model`` string against the catalog and the registry's adapters (a local view kept
current by a watch; no hop), dispatches it to the server of (base, variant) and turns any
failure into the OpenAI error envelope. Metrics are recorded after the response is on its way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from models.adapters.identity import AdapterRef
from models.catalog import Catalog, Resolved
from models.errors import TooManyInputs
from models.registration import AdapterInspector
from models.target import Target
from serve.errors import as_service_error
from serve.ingress.http_io import check_api_key, parse, read_json
from serve.ingress.responses import error_response, json_response, new_request_id
from serve.ingress.schemas import (
    ClassifyRequest,
    EmbeddingsRequest,
    classify_response,
    embeddings_response,
)
from serve.metrics import UNKNOWN_MODEL, ServiceMetrics
from serve.registry.client import RegistryClient
from serve.server.protocol import ModelServerProtocol
from serve.settings import AppSettings


class RouterCore:
    """The ingress logic; ``serve.ingress.app.Router`` is a thin Ray shell over it."""

    def __init__(
        self,
        settings: AppSettings,
        servers: dict[tuple[str, str], ModelServerProtocol],
        metrics: ServiceMetrics | None = None,
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
            response = json_response(200, body)
        except Exception as exc:
            err = as_service_error(exc)
            code = err.code
            response = error_response(err, rid)
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
