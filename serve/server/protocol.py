"""What the ingress sees of a model server, and what a server reports to metrics.

``ModelServerProtocol`` is the one async surface that the co-located ``ModelServer``
(``serve.server.local``) and the handle-backed ``RemoteModelServer`` (``serve.server.remote``)
both implement, so the ingress never asks which one it holds. ``Observer`` is what a server and
its batcher report; ``serve.metrics.ModelMetrics`` implements it and ``NullObserver`` drops it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from models.adapters.identity import AdapterRef
from models.spec import ModelSpec
from models.tokenization import Input


@dataclass(frozen=True)
class Outputs:
    """What one request gets back: ``values`` is ``[inputs, width]``."""

    values: np.ndarray
    tokens: int
    labels: tuple[str, ...] = ()


class ModelServerProtocol(Protocol):
    spec: ModelSpec
    variant: str

    async def embed(
        self, inputs: Sequence[Input], *, truncate: bool = False, dimensions: int | None = None,
        timeout_s: float = 30.0, adapter: AdapterRef | None = None,
    ) -> Outputs: ...

    async def classify(
        self, inputs: Sequence[Input], *, truncate: bool = False, timeout_s: float = 30.0,
        adapter: AdapterRef | None = None,
    ) -> Outputs: ...

    async def health(self) -> None:
        """A tiny real inference through the path requests take; raises when it fails."""

    async def variant_info(self) -> dict:
        """The variant's state as ``/v1/models`` shows it (status, parity, files, reloads)."""

    def alive(self) -> bool:
        """False when the server can no longer serve (Serve then replaces the replica)."""

    def report(self) -> None:
        """Re-record gauges that Serve's periodic health check keeps fresh."""

    def close(self) -> None: ...


class Observer(Protocol):
    def batch_done(self, rows: int, tokens: int, inference_ms: float) -> None: ...

    def queued(self, wait_ms: float) -> None: ...

    def adapter_load(self, result: str, latency_ms: float) -> None: ...

    def adapter_evicted(self) -> None: ...

    def adapters_resident(self, count: int) -> None: ...

    def variant_serving(self, serving: bool) -> None: ...

    def variant_reload(self, result: str) -> None: ...

    def decode_step(self, running: int, waiting: int, kv_usage: float, step_ms: float) -> None: ...

    def generation_done(self, prompt_tokens: int, tokens: int, ttft_s: float | None, tpot_s: float | None,
                        reasons: list[str], cached_tokens: int = 0) -> None: ...


class NullObserver:
    """Records nothing (unit tests, offline use)."""

    def batch_done(self, rows: int, tokens: int, inference_ms: float) -> None:
        pass

    def queued(self, wait_ms: float) -> None:
        pass

    def adapter_load(self, result: str, latency_ms: float) -> None:
        pass

    def adapter_evicted(self) -> None:
        pass

    def adapters_resident(self, count: int) -> None:
        pass

    def variant_serving(self, serving: bool) -> None:
        pass

    def variant_reload(self, result: str) -> None:
        pass

    def decode_step(self, running: int, waiting: int, kv_usage: float, step_ms: float) -> None:
        pass

    def generation_done(self, prompt_tokens: int, tokens: int, ttft_s: float | None, tpot_s: float | None,
                        reasons: list[str], cached_tokens: int = 0) -> None:
        pass
