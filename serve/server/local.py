"""The ModelServer role: one (base, variant) with its Batcher and its adapter LRU.

The same class runs co-located inside the ingress replica or inside a ModelServer deployment
of its own (``serve.server.remote``); both implement ``ModelServerProtocol``. Admission: inputs
are tokenized here and queued in the batcher, which fails fast when full. A request may name an
adapter (an ``AdapterRef`` the ingress resolved from the registry): it is made resident in this
replica's ``AdapterCache`` (loaded lazily), held while the request's rows are in flight, and its
rows ride in the same batches as every other adapter's and the bare base's.

The backend's life (open, parity gate for ONNX, file watch, swap) is ``VariantLifecycle``'s
(``models.variants.lifecycle``); this class only wires it to the batcher and the adapter cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from models.adapters.identity import AdapterRef
from models.adapters.validation import AdapterCheck, validate_adapter
from models.adapters.weights import base_weight_shapes
from models.backend import Backend
from models.errors import (
    AdapterLoadFailed,
    InferenceTimeout,
    InvalidRequest,
    NotReady,
    ServiceError,
    TaskNotSupported,
    VariantUnavailable,
)
from models.postprocess import shorten_embeddings
from models.spec import ModelSpec
from models.tokenization import Input
from models.variants.lifecycle import VariantLifecycle
from serve.server.adapter_cache import AdapterCache
from serve.server.batching import Batcher
from serve.server.protocol import NullObserver, Observer, Outputs

HEALTH_PROBE = "health check"


async def _within(coro, timeout_s: float):
    """``asyncio.wait_for`` without its extra task (``asyncio.timeout``, Python 3.11+): the
    result then reaches the request in the same loop iteration it is set."""
    async with asyncio.timeout(timeout_s):
        return await coro


def report_period_s() -> float:
    """Half of Ray's metrics report interval (10 s by default), at least 0.5 s."""
    try:
        import ray

        return max(0.5, ray._config.metrics_report_interval_ms() / 2000)
    except Exception:  # outside Ray
        return 5.0


class ModelServer:
    def __init__(
        self,
        spec: ModelSpec,
        variant: str,
        backend_factory: Callable[[ModelSpec, str], Backend],
        *,
        observer: Observer | None = None,
        store_roots: Sequence = (),
        on_residency: Callable[[], None] | None = None,
        split_by_adapter: bool = False,
    ):
        self.spec = spec
        self.variant = variant
        self._observer = observer or NullObserver()
        self._roots = list(store_roots)
        self._base_shapes: dict | None = None
        self._loaded: dict[str, tuple[AdapterRef, tuple]] = {}  # adapter key -> (ref, add args)
        self.lifecycle = VariantLifecycle(
            spec, variant, backend_factory, on_swap=self._swap,
            on_reload=self._observer.variant_reload, resident=lambda: dict(self._loaded),
            revalidate=self._validate,
        )
        self.batcher = Batcher(self._unavailable, spec.batching, self._observer,
                               name=f"{spec.id}-{variant}", split_by_adapter=split_by_adapter)
        self.adapters = AdapterCache(
            spec.adapters.adapters_per_replica, self._load_adapter, self._unload_adapter,
            observer=self._observer, on_residency=on_residency,
        )
        self._watcher: asyncio.Task | None = None
        self._reporter: asyncio.Task | None = None

    @property
    def backend(self) -> Backend | None:
        return self.lifecycle.backend

    def load(self) -> ModelServer:
        """Open the backend (see ``VariantLifecycle.open``) and start watching its files."""
        backend = self.lifecycle.open()
        if backend is not None:
            self.batcher.set_runner(backend.predict)
        self.report()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (offline use): no watching, no re-reporting
            return self
        self._reporter = loop.create_task(self._report_every(report_period_s()))
        if self.lifecycle.gated and self.spec.onnx.reload_poll_s > 0:
            self._watcher = loop.create_task(self.lifecycle.watch())
        return self

    def _swap(self, backend: Backend) -> None:
        self.batcher.set_runner(backend.predict)
        self._observer.variant_serving(True)

    def _unavailable(self, rows, adapters=None):
        raise VariantUnavailable(self.lifecycle.info.get("reason", "variant not loaded"), param="model")

    def report(self) -> None:
        """Re-record the gauges: the variant's state and the adapters resident. Ray exports a
        gauge only while it is refreshed (its metrics agent drops a value not set again within
        two report intervals), so ``load`` re-records them every ``report_period_s()``."""
        self._observer.variant_serving(self.backend is not None)
        self._observer.adapters_resident(len(self.adapters.resident()))

    async def _report_every(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            self.report()

    async def variant_info(self) -> dict:
        return dict(self.lifecycle.info)

    async def reload(self) -> dict:
        return await self.lifecycle.reload()

    # -- adapters ----------------------------------------------------------------------------
    async def _load_adapter(self, ref: AdapterRef) -> None:
        """Re-validate the registered files (they may have changed since registration), then
        add the adapter to the backend."""
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
        args = (check, ref.task, ref.labels)
        await self._adapter_call(b.add_adapter, ref.key, *args)
        self._loaded[ref.key] = (ref, args)
        if self.backend is not b:  # the variant was swapped during the load
            try:
                await self._adapter_call(self.backend.add_adapter, ref.key, *args)
            except BaseException:
                self._loaded.pop(ref.key, None)
                raise

    def _validate(self, ref: AdapterRef) -> AdapterCheck:
        if self._base_shapes is None:
            self._base_shapes = base_weight_shapes(self.backend.path)
        return validate_adapter(
            ref.path, self._roots, base_shapes=self._base_shapes, task=ref.task,
            max_rank=self.spec.adapters.max_rank,
        )

    def _unload_adapter(self, key: str):
        self._loaded.pop(key, None)
        return self._adapter_call(self.backend.remove_adapter, key)

    def _adapter_call(self, fn, *args):
        """Adapter updates run beside the forward passes where the backend allows it (torch
        and ONNX slots: a load then never waits for a batch), else between them on the model
        thread."""
        if self.backend.concurrent_adapter_updates:
            return asyncio.get_running_loop().run_in_executor(None, fn, *args)
        return self.batcher.call(fn, *args)

    def sync_adapters(self, registered: dict[str, AdapterRef]) -> None:
        """Registry changed: drop adapters of this base that are gone or replaced (``registered``
        is the registry client's live view: every base, kept current in place)."""
        self.adapters.sync(registered)

    async def preload(self, refs: Sequence[AdapterRef]) -> None:
        """Load pinned adapters of this base now, so their first request does not wait."""
        for ref in refs:
            if ref.base == self.spec.id and ref.pinned:
                key = await self.adapters.acquire(ref)
                self.adapters.release(key)

    # -- inference ---------------------------------------------------------------------------
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
        await self.batcher.submit(b.encode([HEALTH_PROBE]))

    def alive(self) -> bool:
        """Able to serve, or failed on purpose (a failed variant must not get the replica
        restarted over and over)."""
        return (self.backend is not None or self.lifecycle.failed) and self.batcher.alive()

    def close(self) -> None:
        for task in (self._watcher, self._reporter):
            if task is not None:
                task.cancel()
        self.batcher.close()
        self.lifecycle.close()

    async def _infer(
        self, inputs: Sequence[Input], truncate: bool, timeout_s: float,
        adapter: AdapterRef | None = None,
    ) -> Outputs:
        b = self._ready()
        rows = b.encode(inputs, truncate=truncate)
        tokens = sum(len(r) for r in rows)
        if adapter is None:
            return Outputs(await self._submit(rows, None, timeout_s), tokens)
        try:  # the load has a deadline of its own, as long as the inference's
            key = await _within(self.adapters.acquire(adapter), timeout_s)
        except TimeoutError:
            raise InferenceTimeout(f"loading adapter {adapter.name!r} took longer than {timeout_s:g} s") from None
        try:
            values = await self._submit(rows, key, timeout_s)
        finally:
            self.adapters.release(key)
        return Outputs(values, tokens)

    async def _submit(self, rows, key: str | None, timeout_s: float):
        try:
            return await _within(self.batcher.submit(rows, key), timeout_s)
        except TimeoutError:
            raise InferenceTimeout(f"inference took longer than {timeout_s:g} s") from None

    def _check_task(self, task: str, adapter: AdapterRef | None = None) -> None:
        served = adapter.task if adapter is not None else self.spec.task
        if served != task:
            what = f"adapter {adapter.name!r}" if adapter is not None else f"model {self.spec.id!r}"
            raise TaskNotSupported(f"{what} serves task {served!r}, not {task!r}", param="model")

    def _ready(self) -> Backend:
        if self.lifecycle.failed:
            raise VariantUnavailable(self.lifecycle.info["reason"], param="model")
        if self.backend is None:
            raise NotReady(f"model {self.spec.id!r} ({self.variant}) is not loaded yet")
        return self.backend
