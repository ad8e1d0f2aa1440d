"""The ModelServer role: one Backend, its Batcher and its adapter LRU for a (base, variant).

The same class runs co-located inside the ingress replica or inside a ModelServer deployment
of its own (``serve.deployments``); the Router sees the same async interface either way.
A request may name an adapter (an ``AdapterRef`` the Router resolved from the registry): it is
made resident in this replica's ``AdapterCache`` (loaded lazily, on the model thread), held
while the request's rows are in flight, and its rows ride in the same batches as every other
adapter's and the bare base's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from models.adapters import AdapterRef, base_weight_shapes, validate_adapter
from models.backend import Backend, create_backend
from models.errors import (
    InferenceTimeout,
    InvalidRequest,
    ModelLoadError,
    NotReady,
    ServiceError,
    TaskNotSupported,
)
from models.postprocess import shorten_embeddings
from models.spec import ModelSpec
from models.tokenization import Input
from serve.adapter_cache import AdapterCache
from serve.batching import Batcher


async def _within(coro, timeout_s: float):
    """``asyncio.wait_for`` without its extra task where Python has ``asyncio.timeout`` (3.11+):
    the result then reaches the request in the same loop iteration it is set."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(timeout_s):
            return await coro
    return await asyncio.wait_for(coro, timeout_s)


class AdapterLoadFailed(ModelLoadError):
    """A registered adapter could not be loaded in this replica (files changed or broken)."""

    code = "adapter_load_failed"


@dataclass(frozen=True)
class Outputs:
    """What one request gets back: ``values`` is ``[inputs, width]``."""

    values: np.ndarray
    tokens: int
    labels: tuple[str, ...] = ()


class ModelServer:
    def __init__(
        self,
        spec: ModelSpec,
        variant: str,
        *,
        observer=None,
        backend_factory: Callable[[ModelSpec, str], Backend] = create_backend,
        store_roots: Sequence = (),
        on_residency: Callable[[], None] | None = None,
        split_by_adapter: bool = False,
    ):
        self.spec = spec
        self.variant = variant
        self._observer = observer
        self._factory = backend_factory
        self._roots = list(store_roots)
        self._on_residency = on_residency
        self._split = split_by_adapter
        self._base_shapes: dict | None = None
        self.backend: Backend | None = None
        self.batcher: Batcher | None = None
        self.adapters: AdapterCache | None = None

    def load(self) -> "ModelServer":
        backend = self._factory(self.spec, self.variant)
        backend.load()
        self.backend = backend
        self.batcher = Batcher(
            backend.predict, self.spec.batching, self._observer,
            name=f"{self.spec.id}-{self.variant}", split_by_adapter=self._split,
        )
        self.adapters = AdapterCache(
            self.spec.adapters.adapters_per_replica,
            self._load_adapter,
            self._unload_adapter,
            observer=self._observer,
            on_residency=self._on_residency,
        )
        return self

    # -- adapters ----------------------------------------------------------------------------
    async def _load_adapter(self, ref: AdapterRef) -> None:
        """Re-validate the registered files (they may have changed since registration), then
        add the adapter on the model thread, between forward passes."""
        b = self._ready()
        loop = asyncio.get_running_loop()
        try:
            check = await loop.run_in_executor(None, self._validate, ref)
        except ServiceError as exc:
            raise AdapterLoadFailed(f"adapter {ref.name!r} cannot be loaded: {exc.message}") from None
        if check.sha256 != ref.sha256:
            raise AdapterLoadFailed(
                f"adapter {ref.name!r}: its files changed since it was registered; register it "
                "again (replace: true)"
            )
        await self._adapter_call(b.add_adapter, ref.key, check, ref.task, ref.labels)

    def _validate(self, ref: AdapterRef):
        if self._base_shapes is None:
            self._base_shapes = base_weight_shapes(self.backend.path)
        return validate_adapter(
            ref.path, self._roots, base_shapes=self._base_shapes, task=ref.task,
            max_rank=self.spec.adapters.max_rank,
        )

    def _unload_adapter(self, key: str):
        return self._adapter_call(self.backend.remove_adapter, key)

    def _adapter_call(self, fn, *args):
        """Adapter updates run beside the forward passes where the backend allows it (torch
        slots: a load then never waits for a batch), else between them on the model thread."""
        if self.backend.concurrent_adapter_updates:
            return asyncio.get_running_loop().run_in_executor(None, fn, *args)
        return self.batcher.call(fn, *args)

    def sync_adapters(self, registered: dict[str, AdapterRef]) -> None:
        """Registry changed: drop adapters of this base that are gone or replaced."""
        if self.adapters is not None:
            self.adapters.sync({n: r for n, r in registered.items() if r.base == self.spec.id})

    async def preload(self, refs: Sequence[AdapterRef]) -> None:
        """Load pinned adapters of this base now, so their first request does not wait."""
        for ref in refs:
            if ref.base == self.spec.id and ref.pinned:
                key = await self.adapters.acquire(ref)
                self.adapters.release(key)

    def describe(self) -> dict:
        b = self._ready()
        return {
            "max_input_tokens": b.encoder.max_tokens,
            "dimensions": b.dimensions or None,
            "labels": list(b.labels) or None,
        }

    async def embed(
        self, inputs: Sequence[Input], *, truncate: bool = False, dimensions: int | None = None,
        timeout_s: float = 30.0, adapter: AdapterRef | None = None,
    ) -> Outputs:
        self._check_task("embed", adapter)
        b = self._ready()
        if dimensions is not None and not 1 <= dimensions <= b.dimensions:
            raise InvalidRequest(
                f"dimensions {dimensions} is outside 1..{b.dimensions} for model {self.spec.id!r}",
                param="dimensions",
            )
        out = await self._infer(inputs, truncate, timeout_s, adapter)
        vectors = shorten_embeddings(out.values, dimensions, self.spec.normalize)
        return Outputs(vectors, out.tokens)

    async def classify(
        self, inputs: Sequence[Input], *, truncate: bool = False, timeout_s: float = 30.0,
        adapter: AdapterRef | None = None,
    ) -> Outputs:
        self._check_task("classify", adapter)
        out = await self._infer(inputs, truncate, timeout_s, adapter)
        labels = adapter.labels if adapter is not None else self.backend.labels
        return Outputs(out.values, out.tokens, labels)

    async def health(self) -> None:
        """A tiny real inference through the same batcher that serves requests."""
        b = self._ready()
        await self.batcher.submit(b.encode(["health check"]))

    def alive(self) -> bool:
        return self.backend is not None and self.batcher is not None and self.batcher.alive()

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        if self.backend is not None:
            self.backend.close()

    async def _infer(
        self, inputs: Sequence[Input], truncate: bool, timeout_s: float,
        adapter: AdapterRef | None = None,
    ) -> Outputs:
        b = self._ready()
        rows = b.encode(inputs, truncate=truncate)
        if adapter is None:
            return Outputs(await self._submit(rows, None, timeout_s), sum(len(r) for r in rows))
        try:  # the load counts against the request's deadline too
            key = await asyncio.wait_for(self.adapters.acquire(adapter), timeout_s)
        except asyncio.TimeoutError:
            raise InferenceTimeout(f"loading adapter {adapter.name!r} took longer than {timeout_s:g} s") from None
        try:
            values = await self._submit(rows, key, timeout_s)
        finally:
            self.adapters.release(key)
        return Outputs(values, sum(len(r) for r in rows))

    async def _submit(self, rows, key: str | None, timeout_s: float):
        try:
            return await _within(self.batcher.submit(rows, key), timeout_s)
        except asyncio.TimeoutError:
            raise InferenceTimeout(f"inference took longer than {timeout_s:g} s") from None

    def _check_task(self, task: str, adapter: AdapterRef | None = None) -> None:
        served = adapter.task if adapter is not None else self.spec.task
        if served != task:
            what = f"adapter {adapter.name!r}" if adapter is not None else f"model {self.spec.id!r}"
            raise TaskNotSupported(f"{what} serves task {served!r}, not {task!r}", param="model")

    def _ready(self) -> Backend:
        if self.backend is None or self.batcher is None:
            raise NotReady(f"model {self.spec.id!r} ({self.variant}) is not loaded yet")
        return self.backend
