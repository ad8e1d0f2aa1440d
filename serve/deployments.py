"""Ray Serve deployment of the ModelServer role, the handle-backed proxy the Router uses, and
how any replica joins the adapter registry.

Placement ``separate`` puts a (base, variant) in a deployment of its own. Requests for the bare
base carry no multiplexed model id, so Serve balances them freely; adapter requests carry the
adapter name as multiplexed model id, and each replica reports the adapters resident in its LRU
as its multiplexed ids, so Serve's router prefers replicas that already hold the adapter
(affinity) and falls back to any replica, which then loads it lazily.

We report the ids ourselves rather than through ``@serve.multiplexed``: that decorator keeps
one model object per id with its own LRU, while here one backend holds many adapters and one
batch mixes them (``serve.adapter_cache``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os

from ray import serve

from models.adapters import AdapterRef
from serve.errors import as_service_error
from serve.metrics import ModelMetrics
from serve.model_server import ModelServer, Outputs
from serve.registry import RegistryClient, get_or_create_registry
from models.backend import create_backend
from serve.settings import AdapterSettings, ServedModel, VariantSettings

log = logging.getLogger("loraserve")


def replica_name() -> str:
    try:
        rid = serve.get_replica_context().replica_id
        return f"{rid.deployment_id.name}#{rid.unique_id}"
    except Exception:  # outside a replica (tests)
        return f"local#{os.getpid()}"


def report_multiplexed_ids(names: list[str]) -> None:
    """Tell Serve's controller which adapters this replica holds (routing affinity).

    Uses the same private call ``@serve.multiplexed`` uses (Ray 2.60); a failure only costs
    affinity, never a request.
    """
    try:
        from ray.serve._private.common import RequestRoutingInfo
        from ray.serve.context import _get_global_client

        context = serve.get_replica_context()
        _get_global_client().record_request_routing_info(
            RequestRoutingInfo(replica_id=context.replica_id, multiplexed_model_ids=names)
        )
    except Exception as exc:
        log.warning("could not report resident adapters for routing: %s", exc)


async def start_registry(
    adapters: AdapterSettings, servers: dict, inspector=None, config_refs=None
) -> RegistryClient:
    """Connect this replica to the registry: sync the config's adapters (the Router passes
    ``inspector``), watch for changes, keep local ModelServers in step, preload pinned ones."""
    actor = get_or_create_registry(adapters.state_path())
    if inspector is not None:
        loop = asyncio.get_running_loop()
        refs = []
        for a in adapters.preload:
            refs.append(await loop.run_in_executor(
                None, lambda a=a: inspector.inspect(a.name, a.path, a.base, pinned=a.pinned, origin="config")
            ))
        await actor.sync_config.remote([r.to_dict() for r in refs])
    local = [s for s in servers.values() if isinstance(s, ModelServer)]

    def resident() -> dict[str, list[str]]:
        return {s.spec.id: s.adapters.resident() for s in local if s.adapters is not None}

    def on_change(old: dict, new: dict) -> None:
        for s in local:
            s.sync_adapters(new)
        fresh = [r for n, r in new.items() if r.pinned and old.get(n) != r]
        for s in local if fresh else ():
            asyncio.get_running_loop().create_task(_preload(s, fresh))

    return RegistryClient(actor, replica_name(), on_change=on_change, resident=resident)


async def _preload(server: ModelServer, refs: list[AdapterRef]) -> None:
    try:
        await server.preload(refs)
    except Exception as exc:  # a broken pinned adapter must not take the replica down
        log.error("preloading adapters on %s failed: %s", server.spec.id, as_service_error(exc).message)


@serve.deployment
class ModelServerDeployment:
    async def __init__(
        self, spec: dict, variant: str, adapters: dict | None = None, variants: dict | None = None
    ):
        model = ServedModel.model_validate(spec)
        settings = AdapterSettings.model_validate(adapters or {})
        cache = VariantSettings.model_validate(variants or {}).cache_path()
        self._client: RegistryClient | None = None
        self.server = ModelServer(
            model, variant, observer=ModelMetrics(model.id, variant),
            store_roots=settings.store_roots(), on_residency=self._residency,
            backend_factory=functools.partial(create_backend, variant_cache=cache),
        ).load()
        self._client = await start_registry(settings, {(model.id, variant): self.server})
        await self._client.start()

    def _residency(self) -> None:
        report_multiplexed_ids(self.server.adapters.resident())
        if self._client is not None:
            self._client.residency_changed()

    async def embed(self, inputs, **kw) -> Outputs:
        return await self.server.embed(inputs, **kw)

    async def classify(self, inputs, **kw) -> Outputs:
        return await self.server.classify(inputs, **kw)

    async def health(self) -> None:
        await self.server.health()

    def describe(self) -> dict:
        return self.server.describe()

    def variant_info(self) -> dict:
        return self.server.variant_info()

    def check_health(self) -> None:
        self.server.report()
        if not self.server.alive():
            raise RuntimeError("model server batcher is not running")

    def __del__(self):
        if getattr(self, "_client", None) is not None:
            self._client.close()


class RemoteModelServer:
    """Same async surface as ``ModelServer``, one Ray hop away; adapter requests go with the
    adapter as multiplexed model id."""

    def __init__(self, spec: ServedModel, variant: str, handle):
        self.spec = spec
        self.variant = variant
        self.handle = handle
        self._by_adapter: dict[str, object] = {}

    def _handle(self, adapter: AdapterRef | None):
        if adapter is None:
            return self.handle
        h = self._by_adapter.get(adapter.name)
        if h is None:
            if len(self._by_adapter) >= 4096:  # bounded: handles are cheap to rebuild
                self._by_adapter.clear()
            h = self._by_adapter[adapter.name] = self.handle.options(
                multiplexed_model_id=adapter.name
            )
        return h

    async def embed(self, inputs, adapter: AdapterRef | None = None, **kw) -> Outputs:
        return await self._handle(adapter).embed.remote(inputs, adapter=adapter, **kw)

    async def classify(self, inputs, adapter: AdapterRef | None = None, **kw) -> Outputs:
        return await self._handle(adapter).classify.remote(inputs, adapter=adapter, **kw)

    async def health(self) -> None:
        await self.handle.health.remote()

    async def variant_info(self) -> dict:
        """What one replica of the deployment reports (replicas open the same files)."""
        return await self.handle.variant_info.remote()

    def alive(self) -> bool:
        return True  # its own replicas are health-checked by Serve

    def close(self) -> None:
        pass


def deployment_name(model_id: str, variant: str) -> str:
    return f"ModelServer-{model_id}-{variant}"
