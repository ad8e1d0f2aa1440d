"""The ModelServer role: one Backend, its Batcher and its adapter LRU for a (base, variant).

The same class runs co-located inside the ingress replica or inside a ModelServer deployment
of its own (``serve.deployments``); the Router sees the same async interface either way.
A request may name an adapter (an ``AdapterRef`` the Router resolved from the registry): it is
made resident in this replica's ``AdapterCache`` (loaded lazily, on the model thread), held
while the request's rows are in flight, and its rows ride in the same batches as every other
adapter's and the bare base's.

ONNX variants (``onnx``, ``onnx-int8``) pass the parity gate (``models.parity``) before they
serve; one that fails to open or to match torch stays in the catalog with ``status: failed`` and
its reason (``variant_info``, shown by ``GET /v1/models``), answers 503 ``variant_unavailable``,
and never takes the replica down. A watcher notices when the variant's files are replaced, opens
and checks the new ones beside the serving session (off the request path), and swaps them in
between two batches only if they pass; otherwise the old session keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
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
    VariantUnavailable,
)
from models.postprocess import shorten_embeddings
from models.spec import ONNX_VARIANTS, ModelSpec
from models.tokenization import Input
from serve.adapter_cache import AdapterCache
from serve.batching import Batcher

log = logging.getLogger("loraserve")


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
        self.info: dict = {"status": "loading"}
        self._loaded: dict[str, tuple] = {}  # adapter key -> (ref, add_adapter args), for reloads
        self._watcher: asyncio.Task | None = None
        self._signature = None  # of the variant files last opened or tried (ONNX)
        self._watch_paths: list = []  # the files the watcher stats

    def load(self) -> "ModelServer":
        """Open the backend. A torch failure raises (the replica cannot serve); an ONNX variant
        that fails to open or fails parity is recorded as failed and the replica serves on."""
        backend = None
        try:
            backend = self._factory(self.spec, self.variant)
            self._watch_paths = list(getattr(backend, "files", {}).values())
            self._signature = self._current_signature()
            parity = self._open(backend)
        except Exception as exc:
            if self.variant not in ONNX_VARIANTS:
                raise
            self._fail(exc)
            _close_quietly(backend)
        else:
            self.backend = backend
            self.info = self._serving_info(backend, parity)
        self.report()
        self.batcher = Batcher(
            self._unavailable, self.spec.batching, self._observer,
            name=f"{self.spec.id}-{self.variant}", split_by_adapter=self._split,
        )
        if self.backend is not None:
            self.batcher.set_runner(self.backend.predict)
        self.adapters = AdapterCache(
            self.spec.adapters.adapters_per_replica,
            self._load_adapter,
            self._unload_adapter,
            observer=self._observer,
            on_residency=self._on_residency,
        )
        if self.variant in ONNX_VARIANTS and self.spec.onnx.reload_poll_s > 0:
            try:
                self._watcher = asyncio.get_running_loop().create_task(self._watch())
            except RuntimeError:  # no event loop (offline use): no watching
                pass
        return self

    # -- variants ----------------------------------------------------------------------------
    def _open(self, backend: Backend) -> dict | None:
        """Load ``backend``; for an ONNX variant, run the parity gate. Returns the parity
        result; raises ``VariantUnavailable`` (with it) when the variant must not serve."""
        backend.load()
        if self.variant not in ONNX_VARIANTS:
            return None
        from models.onnx_export import reference_for
        from models.parity import check_variant

        parity = check_variant(backend, *reference_for(self.spec, backend))
        if not parity["passed"]:
            err = VariantUnavailable(f"{self.spec.id}@{self.variant} is not served: {parity['reason']}")
            err.parity = parity
            raise err
        return parity

    def _serving_info(self, backend: Backend, parity: dict | None) -> dict:
        info = {"status": "serving", "parity": parity or {"reference": True}}
        files = getattr(backend, "file_sha256", None)
        if files:
            info["files"] = {name: sha[:16] for name, sha in files.items()}
        info["loaded_at"] = int(time.time())
        return info

    def _fail(self, exc: Exception) -> None:
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        self.info = {"status": "failed", "reason": message, "parity": getattr(exc, "parity", None),
                     "failed_at": int(time.time()),
                     **({"last_reload": self.info["last_reload"]} if "last_reload" in self.info else {})}
        log.error("%s@%s does not serve: %s", self.spec.id, self.variant, message)

    def _unavailable(self, rows, adapters=None):
        raise VariantUnavailable(self.info.get("reason", "variant not loaded"), param="model")

    def report(self) -> None:
        """Re-record the variant's state (Serve's periodic health check calls this: a gauge set
        once at start can be lost before Ray's metrics agent is connected)."""
        self._record("variant_serving", self.backend is not None)

    def _record(self, what: str, value) -> None:
        """Variant metrics, when the observer records them (``serve.metrics.ModelMetrics``)."""
        fn = getattr(self._observer, what, None)
        if fn is not None:
            fn(value)

    def variant_info(self) -> dict:
        return dict(self.info)

    async def _watch(self) -> None:
        """Poll the variant files; when they change (and then hold still for a moment), try
        them: a reload that fails leaves the serving session as it was."""
        poll = self.spec.onnx.reload_poll_s
        while True:
            await asyncio.sleep(poll)
            try:
                sig = self._current_signature()
                # unchanged, or a file missing (being replaced, or the cache was cleaned: a
                # serving replica never rebuilds variants itself)
                if sig is None or sig == self._signature or None in sig:
                    continue
                await asyncio.sleep(min(poll, 0.5))  # a copy in progress: wait until it settles
                if self._current_signature() != sig:
                    continue
                await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher must outlive any one bad replacement
                log.exception("variant watcher of %s@%s", self.spec.id, self.variant)

    def _current_signature(self):
        """Stat the files last opened (or tried). None when there are none to watch: the
        variant could not even be built, and polling must not rebuild it every few seconds."""
        from models.onnx_backend import files_signature

        return files_signature(self._watch_paths) if self._watch_paths else None

    async def reload(self) -> dict:
        """Open the variant's current files beside the serving backend; swap them in between
        batches if they pass parity, with every resident adapter re-added first."""
        loop = asyncio.get_running_loop()
        self._signature = self._current_signature()  # tried once per change, pass or fail
        new = None
        try:
            new = await loop.run_in_executor(None, self._factory, self.spec, self.variant)
            self._watch_paths = list(getattr(new, "files", {}).values()) or self._watch_paths
            parity = await loop.run_in_executor(None, self._open, new)
            while True:  # adapters loaded meanwhile are added too, then the swap is atomic
                missing = {k: v for k, v in self._loaded.items() if k not in new.loaded_adapters()}
                if not missing:
                    break
                for key, (ref, _) in missing.items():
                    # re-read from disk: the same checks and content as when it was loaded
                    check = await loop.run_in_executor(None, self._validate, ref)
                    if check.sha256 != ref.sha256:
                        raise AdapterLoadFailed(
                            f"resident adapter {ref.name!r} changed on disk since it was loaded; "
                            "unload or re-register it, then replace the variant files again")
                    await loop.run_in_executor(None, new.add_adapter, key, check, ref.task, ref.labels)
        except Exception as exc:
            _close_quietly(new)
            message = getattr(exc, "message", None) or str(exc)
            self.info = {**self.info, "last_reload": {"result": "rejected", "reason": message,
                                                      "at": int(time.time())}}
            if self.backend is None:
                self._fail(exc)
            self._record("variant_reload", "rejected")
            log.error("replacement files of %s@%s rejected, the serving ones stay: %s",
                      self.spec.id, self.variant, message)
            return self.variant_info()
        for key in set(new.loaded_adapters()) - set(self._loaded):
            new.remove_adapter(key)  # unloaded while the new backend was being prepared
        self.backend = new
        self.batcher.set_runner(new.predict)
        self.info = {**self._serving_info(new, parity),
                     "last_reload": {"result": "replaced", "at": int(time.time())}}
        self._record("variant_reload", "replaced")
        self._record("variant_serving", True)
        log.info("%s@%s now serves its replaced files (parity passed)", self.spec.id, self.variant)
        return self.variant_info()

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
        args = (check, ref.task, ref.labels)
        await self._adapter_call(b.add_adapter, ref.key, *args)
        self._loaded[ref.key] = (ref, args)
        if self.backend is not b:  # the variant was swapped during the load
            try:
                await self._adapter_call(self.backend.add_adapter, ref.key, *args)
            except BaseException:
                self._loaded.pop(ref.key, None)
                raise

    def _validate(self, ref: AdapterRef):
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
        """Able to serve, or failed on purpose (a failed variant must not get the replica
        restarted over and over)."""
        loaded = self.backend is not None or self.info.get("status") == "failed"
        return loaded and self.batcher is not None and self.batcher.alive()

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
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
        if self.info.get("status") == "failed" and self.backend is None:
            raise VariantUnavailable(self.info["reason"], param="model")
        if self.backend is None or self.batcher is None:
            raise NotReady(f"model {self.spec.id!r} ({self.variant}) is not loaded yet")
        return self.backend


def _close_quietly(backend: Backend | None) -> None:
    """Free a backend that will not serve (its sessions can be large)."""
    if backend is not None:
        try:
            backend.close()
        except Exception:  # a half-loaded backend may fail to close; it is dropped anyway
            pass
