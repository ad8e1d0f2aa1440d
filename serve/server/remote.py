"""The ModelServer role one Ray hop away: the handle-backed proxy the ingress talks to.

Placement ``separate`` puts a (base, variant) in a deployment of its own
(``serve.server.deployment``). Requests for the bare base carry no multiplexed model id, so Serve
balances them freely; adapter requests carry the adapter name as multiplexed model id, and each
replica reports the adapters resident in its LRU as its multiplexed ids, so Serve's router
prefers replicas that already hold the adapter (affinity) and falls back to any replica, which
then loads it lazily. ``RemoteModelServer`` gives the ingress the same surface as a local
``ModelServer`` (``ModelServerProtocol``).

We report the ids ourselves rather than through ``@serve.multiplexed``: that decorator keeps
one model object per id with its own LRU, while here one backend holds many adapters and one
batch mixes them (``serve.server.adapter_cache``).
"""

from __future__ import annotations

from models.adapters.identity import AdapterRef
from serve.server.protocol import Outputs
from serve.settings import ServedModel

MAX_HANDLES = 4096  # per-adapter handles kept; cheap to rebuild


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
            if len(self._by_adapter) >= MAX_HANDLES:
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

    def report(self) -> None:
        pass  # its replicas report their own gauges

    def close(self) -> None:
        pass
