"""Ray Serve deployment of the ModelServer role, and the handle-backed proxy the Router uses.

Placement ``separate`` puts a (base, variant) in a deployment of its own. Requests for the bare
base carry no multiplexed model id, so Serve balances them freely; adapter requests (a later
issue) will carry the adapter name as multiplexed id so they prefer replicas that hold it.
"""

from __future__ import annotations

from ray import serve

from serve.metrics import ModelMetrics
from serve.model_server import ModelServer, Outputs
from serve.settings import ServedModel


@serve.deployment
class ModelServerDeployment:
    def __init__(self, spec: dict, variant: str):
        model = ServedModel.model_validate(spec)
        self.server = ModelServer(model, variant, observer=ModelMetrics(model.id, variant)).load()

    async def embed(self, inputs, **kw) -> Outputs:
        return await self.server.embed(inputs, **kw)

    async def classify(self, inputs, **kw) -> Outputs:
        return await self.server.classify(inputs, **kw)

    async def health(self) -> None:
        await self.server.health()

    def describe(self) -> dict:
        return self.server.describe()

    def check_health(self) -> None:
        if not self.server.alive():
            raise RuntimeError("model server batcher is not running")


class RemoteModelServer:
    """Same async surface as ``ModelServer``, one Ray hop away."""

    def __init__(self, spec: ServedModel, variant: str, handle):
        self.spec = spec
        self.variant = variant
        self.handle = handle

    async def embed(self, inputs, **kw) -> Outputs:
        return await self.handle.embed.remote(inputs, **kw)

    async def classify(self, inputs, **kw) -> Outputs:
        return await self.handle.classify.remote(inputs, **kw)

    async def health(self) -> None:
        await self.handle.health.remote()

    def alive(self) -> bool:
        return True  # its own replicas are health-checked by Serve

    def close(self) -> None:
        pass


def deployment_name(model_id: str, variant: str) -> str:
    return f"ModelServer-{model_id}-{variant}"
