"""How model servers come to be in a replica, and how a replica joins the adapter registry.

``build_servers`` makes the server of every (base, variant) of the config: a ``ModelServer`` in
this replica for placement ``colocated``, a ``RemoteModelServer`` over the deployment's handle
for ``separate``; backends come from ``models.factory.backend_factory``. ``start_registry``
connects a replica to the registry actor and keeps its local servers in step with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from ray import serve

from models.adapters.identity import AdapterRef
from models.factory import backend_factory
from models.registration import AdapterInspector
from serve.errors import as_service_error
from serve.metrics import GenerationMetrics, ModelMetrics
from serve.registry.client import RegistryClient
from serve.registry.core import get_or_create_registry
from serve.server.generation import GenerativeServer
from serve.server.local import ModelServer
from serve.server.protocol import ModelServerProtocol
from serve.server.remote import RemoteModelServer
from serve.settings import AdapterSettings, AppSettings

log = logging.getLogger("loraserve")


def build_servers(
    settings: AppSettings, handles: dict, on_residency: Callable[[], None] | None = None
) -> dict[tuple[str, str], ModelServerProtocol]:
    servers: dict[tuple[str, str], ModelServerProtocol] = {}
    roots = settings.adapters.store_roots()
    factory = backend_factory(settings.variants.cache_path())
    for spec in settings.models:
        for variant in spec.variants:
            if spec.placement == "colocated":
                generative = spec.task == "generate"
                cls, observer = (GenerativeServer, GenerationMetrics) if generative else (ModelServer, ModelMetrics)
                servers[(spec.id, variant)] = cls(
                    spec, variant, factory, observer=observer(spec.id, variant),
                    store_roots=roots, on_residency=on_residency,
                ).load()
            else:
                servers[(spec.id, variant)] = RemoteModelServer(spec, variant, handles[f"{spec.id}@{variant}"])
    return servers


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
    adapters: AdapterSettings, servers: dict, inspector: AdapterInspector | None = None,
) -> RegistryClient:
    """Connect this replica to the registry: sync the config's adapters (the Router passes
    ``inspector``), watch for changes, keep local ModelServers in step, preload pinned ones."""
    actor = get_or_create_registry(adapters.state_path())
    local = [s for s in servers.values() if isinstance(s, ModelServer)]

    def resident() -> dict[str, list[str]]:
        return {s.spec.id: s.adapters.resident() for s in local}

    def on_change(changed: dict) -> None:
        for s in local:
            s.sync_adapters(client.adapters)
        fresh = [new for _, new in changed.values() if new is not None and new.pinned]
        for s in local if fresh else ():
            asyncio.get_running_loop().create_task(_preload(s, fresh))

    client = RegistryClient(actor, replica_name(), on_change=on_change, resident=resident)
    if inspector is not None:
        loop = asyncio.get_running_loop()
        refs = []
        for a in adapters.preload:
            refs.append(await loop.run_in_executor(
                None, lambda a=a: inspector.inspect(a.name, a.path, a.base, pinned=a.pinned, origin="config")
            ))
        await client.sync_config(refs)
    return client


async def _preload(server: ModelServer, refs: list[AdapterRef]) -> None:
    try:
        await server.preload(refs)
    except Exception as exc:  # a broken pinned adapter must not take the replica down
        log.error("preloading adapters on %s failed: %s", server.spec.id, as_service_error(exc).message)
