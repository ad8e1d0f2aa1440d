"""Dynamic batching inside one ModelServer replica.

Policy: rows (one per input) wait in a bounded FIFO queue. One worker task takes as many rows as
fit (``max_batch_size`` rows and ``max_batch_tokens`` of rows x padded length), optionally waits
``max_wait_ms`` for more when the batch is not full, and runs the forward pass in a dedicated
thread so the event loop keeps accepting requests. Rows that arrive during a forward pass form
the next batch, so under load batches grow by themselves and at low load nobody waits.

Rows of one request may ride in different batches; rows of different requests (later: different
adapters) share one. Unlike Ray's ``@serve.batch`` with multiplexing, nothing splits a batch by
model id. A full queue fails fast with ``Overloaded`` (503 + Retry-After). Cancelled requests'
rows are dropped before they reach the backend.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from models.errors import Overloaded
from models.spec import BatchingSpec

RunBatch = Callable[[Sequence[Sequence[int]]], np.ndarray]


@dataclass
class _Row:
    ids: Sequence[int]
    future: asyncio.Future
    first: bool  # first row of its request: the one whose queue wait is recorded
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, run_batch: RunBatch, spec: BatchingSpec, observer=None, name: str = "batcher"):
        self._run = run_batch
        self.spec = spec
        self._observer = observer
        self._queue: collections.deque[_Row] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.batches_run = 0

    @property
    def queued_rows(self) -> int:
        return len(self._queue)

    def alive(self) -> bool:
        return self._worker is None or not self._worker.done()

    async def submit(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Queue the rows of one request; return their outputs stacked ``[len(rows), width]``."""
        if len(self._queue) + len(rows) > self.spec.max_queue_rows:
            raise Overloaded(
                f"replica queue is full ({len(self._queue)} rows waiting, limit "
                f"{self.spec.max_queue_rows}); retry shortly"
            )
        self._ensure_worker()
        loop = asyncio.get_running_loop()
        items = [_Row(ids, loop.create_future(), i == 0) for i, ids in enumerate(rows)]
        self._queue.extend(items)
        self._wake.set()
        try:
            outs = await asyncio.gather(*(r.future for r in items))
        except BaseException:
            for r in items:
                r.future.cancel()
            raise
        return np.stack(outs)

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._loop())

    def _take(self) -> list[_Row]:
        batch: list[_Row] = []
        longest = 0
        while self._queue and len(batch) < self.spec.max_batch_size:
            row = self._queue[0]
            if row.future.done():  # cancelled by its request
                self._queue.popleft()
                continue
            width = max(longest, len(row.ids))
            if batch and width * (len(batch) + 1) > self.spec.max_batch_tokens:
                break
            longest = width
            batch.append(self._queue.popleft())
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
            if self.spec.max_wait_ms > 0 and len(self._queue) < self.spec.max_batch_size:
                await asyncio.sleep(self.spec.max_wait_ms / 1000)
            batch = self._take()
            if not batch:
                continue
            start = time.perf_counter()
            if self._observer is not None:
                for r in batch:
                    if r.first:
                        self._observer.queued((start - r.enqueued) * 1000)
            try:
                out = await loop.run_in_executor(self._executor, self._run, [r.ids for r in batch])
            except Exception as exc:  # the whole batch failed: each request learns why
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(exc)
                continue
            self.batches_run += 1
            if self._observer is not None:
                tokens = sum(len(r.ids) for r in batch)
                self._observer.batch_done(len(batch), tokens, (time.perf_counter() - start) * 1000)
            for r, o in zip(batch, out):
                if not r.future.done():
                    r.future.set_result(o)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
