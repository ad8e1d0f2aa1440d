"""The ModelServer role: one Backend and its Batcher for a (base, variant).

The same class runs co-located inside the ingress replica or inside a ModelServer deployment
of its own (``serve.deployments``); the Router sees the same async interface either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from models.backend import Backend, create_backend
from models.errors import InferenceTimeout, InvalidRequest, NotReady, TaskNotSupported
from models.postprocess import shorten_embeddings
from models.spec import ModelSpec
from models.tokenization import Input
from serve.batching import Batcher


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
    ):
        self.spec = spec
        self.variant = variant
        self._observer = observer
        self._factory = backend_factory
        self.backend: Backend | None = None
        self.batcher: Batcher | None = None

    def load(self) -> "ModelServer":
        backend = self._factory(self.spec, self.variant)
        backend.load()
        self.backend = backend
        self.batcher = Batcher(
            backend.predict, self.spec.batching, self._observer, name=f"{self.spec.id}-{self.variant}"
        )
        return self

    def describe(self) -> dict:
        b = self._ready()
        return {
            "max_input_tokens": b.encoder.max_tokens,
            "dimensions": b.dimensions or None,
            "labels": list(b.labels) or None,
        }

    async def embed(
        self, inputs: Sequence[Input], *, truncate: bool = False, dimensions: int | None = None,
        timeout_s: float = 30.0,
    ) -> Outputs:
        self._check_task("embed")
        b = self._ready()
        if dimensions is not None and not 1 <= dimensions <= b.dimensions:
            raise InvalidRequest(
                f"dimensions {dimensions} is outside 1..{b.dimensions} for model {self.spec.id!r}",
                param="dimensions",
            )
        out = await self._infer(inputs, truncate, timeout_s)
        vectors = shorten_embeddings(out.values, dimensions, self.spec.normalize)
        return Outputs(vectors, out.tokens)

    async def classify(
        self, inputs: Sequence[Input], *, truncate: bool = False, timeout_s: float = 30.0
    ) -> Outputs:
        self._check_task("classify")
        out = await self._infer(inputs, truncate, timeout_s)
        return Outputs(out.values, out.tokens, self.backend.labels)

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

    async def _infer(self, inputs: Sequence[Input], truncate: bool, timeout_s: float) -> Outputs:
        b = self._ready()
        rows = b.encode(inputs, truncate=truncate)
        try:
            values = await asyncio.wait_for(self.batcher.submit(rows), timeout_s)
        except asyncio.TimeoutError:
            raise InferenceTimeout(f"inference took longer than {timeout_s:g} s") from None
        return Outputs(values, sum(len(r) for r in rows))

    def _check_task(self, task: str) -> None:
        if self.spec.task != task:
            raise TaskNotSupported(
                f"model {self.spec.id!r} serves task {self.spec.task!r}, not {task!r}", param="model"
            )

    def _ready(self) -> Backend:
        if self.backend is None or self.batcher is None:
            raise NotReady(f"model {self.spec.id!r} ({self.variant}) is not loaded yet")
        return self.backend
