"""The ModelServer deployment: one (base, variant) with placement ``separate`` as a Ray Serve
deployment of its own, joined to the adapter registry like any replica. Each replica reports
its resident adapters as multiplexed model ids (routing affinity; see ``serve.server.remote``).
"""

from __future__ import annotations

from ray import serve

from models.factory import backend_factory
from serve.autoscaling import ADAPTER_LOADS_PER_S, LoadRate
from serve.metrics import ModelMetrics
from serve.registry.client import RegistryClient
from serve.server.local import ModelServer
from serve.server.protocol import Outputs
from serve.server.wiring import report_multiplexed_ids, start_registry
from serve.settings import AdapterSettings, ServedModel, VariantSettings


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
class ModelServerDeployment:
    async def __init__(
        self, spec: dict, variant: str, adapters: dict | None = None, variants: dict | None = None
    ):
        model = ServedModel.model_validate(spec)
        settings = AdapterSettings.model_validate(adapters or {})
        cache = VariantSettings.model_validate(variants or {}).cache_path()
        self._client: RegistryClient | None = None
        self._load_rate = LoadRate()
        self.server = ModelServer(
            model, variant, backend_factory(cache), observer=ModelMetrics(model.id, variant),
            store_roots=settings.store_roots(), on_residency=self._residency,
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

    async def variant_info(self) -> dict:
        return await self.server.variant_info()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Adapter pressure for ``serve.autoscaling.AdapterPressurePolicy``."""
        return {ADAPTER_LOADS_PER_S: self._load_rate(self.server.adapters.loads)}

    def check_health(self) -> None:
        self.server.report()
        if not self.server.alive():
            raise RuntimeError("model server batcher is not running")

    def __del__(self):
        if getattr(self, "_client", None) is not None:
            self._client.close()


def deployment_name(model_id: str, variant: str) -> str:
    return f"ModelServer-{model_id}-{variant}"
