"""Dynamic batching inside one ModelServer replica.

Policy: rows (one per input) wait in a bounded FIFO queue. One worker task takes as many rows as
fit (``max_batch_size`` rows and ``max_batch_tokens`` of rows x padded length), optionally waits
``max_wait_ms`` for more when the batch is not full, and runs the forward pass in a dedicated
thread so the event loop keeps accepting requests. Rows that arrive during a forward pass form
the next batch, so under load batches grow by themselves and at low load nobody waits.

Rows of one request may ride in different batches; rows of different requests and of different
adapters (each row carries its adapter's key, or None for the bare base) share one: the backend
applies each row's adapter inside the one forward pass. Ray's ``@serve.batch`` with multiplexing
splits batches by model id instead; ``split_by_adapter`` reproduces that for comparison
(``loadtest/bench_adapters.py``). A full queue fails fast with ``Overloaded`` (503 +
Retry-After). Cancelled requests' rows are dropped before they reach the backend.

The executor's one thread is also where adapters are added to and removed from the backend
(``call``), so those never run while a forward pass is using the model.
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

# run_batch(rows, adapters): adapters is None when every row is for the bare base.
RunBatch = Callable[[Sequence[Sequence[int]], Sequence[str | None] | None], np.ndarray]


@dataclass
class _Row:
    ids: Sequence[int]
    future: asyncio.Future
    first: bool  # first row of its request: the one whose queue wait is recorded
    adapter: str | None = None
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self, run_batch: RunBatch, spec: BatchingSpec, observer=None, name: str = "batcher",
        split_by_adapter: bool = False,
    ):
        self._run = run_batch
        self.split_by_adapter = split_by_adapter or spec.split_by_adapter
        self.spec = spec
        self._observer = observer
        self._queue: collections.deque[_Row] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.batches_run = 0
        self._busy_since: float | None = None  # when the forward pass in flight started

    def set_runner(self, run_batch: RunBatch) -> None:
        """Run later batches with ``run_batch`` (a replaced variant); a batch in flight
        finishes on the old one."""
        self._run = run_batch

    @property
    def queued_rows(self) -> int:
        return len(self._queue)

    def alive(self) -> bool:
        """The batch loop runs, and no forward pass has run longer than ``stuck_batch_s`` (a
        wedged backend: the health check then fails and Serve replaces the replica)."""
        busy = self._busy_since
        if busy is not None and time.perf_counter() - busy > self.spec.stuck_batch_s:
            return False
        return self._worker is None or not self._worker.done()

    async def call(self, fn: Callable, *args):
        """Run ``fn(*args)`` on the model thread, between forward passes."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def submit(self, rows: Sequence[Sequence[int]], adapter: str | None = None) -> np.ndarray:
        """Queue the rows of one request; return their outputs stacked ``[len(rows), width]``."""
        if len(self._queue) + len(rows) > self.spec.max_queue_rows:
            raise Overloaded(
                f"replica queue is full ({len(self._queue)} rows waiting, limit "
                f"{self.spec.max_queue_rows}); retry shortly"
            )
        self._ensure_worker()
        loop = asyncio.get_running_loop()
        items = [_Row(ids, loop.create_future(), i == 0, adapter) for i, ids in enumerate(rows)]
        self._queue.extend(items)
        self._wake.set()
        try:
            if len(items) == 1:  # the usual case; gather would add a loop iteration
                outs = [await items[0].future]
            else:
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
        if self.split_by_adapter:
            return self._take_one_adapter()
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

    def _take_one_adapter(self) -> list[_Row]:
        """Ray's multiplexed batching, for comparison: only rows of the oldest row's adapter."""
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()
        if not self._queue:
            return []
        want = self._queue[0].adapter
        batch: list[_Row] = []
        rest: collections.deque[_Row] = collections.deque()
        longest = 0
        while self._queue:
            row = self._queue.popleft()
            width = max(longest, len(row.ids))
            if (
                row.future.done()
                or row.adapter != want
                or len(batch) >= self.spec.max_batch_size
                or (batch and width * (len(batch) + 1) > self.spec.max_batch_tokens)
            ):
                if not row.future.done():
                    rest.append(row)
                continue
            longest = width
            batch.append(row)
        self._queue = rest
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
            start = self._busy_since = time.perf_counter()
            try:
                adapters = [r.adapter for r in batch]
                if not any(adapters):
                    adapters = None
                out = await loop.run_in_executor(
                    self._executor, self._run, [r.ids for r in batch], adapters
                )
            except Exception as exc:  # the whole batch failed: each request learns why
                self._busy_since = None
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(exc)
                continue
            end = time.perf_counter()
            self._busy_since = None
            self.batches_run += 1
            for r, o in zip(batch, out):
                if not r.future.done():
                    r.future.set_result(o)
            if self._observer is not None:
                # Ray's metric calls cost ~0.1 ms; scheduled after the results are set, they
                # run once the waiting requests have moved on instead of before (measured at c1).
                loop.call_soon(self._observe, batch, start, end)

    def _observe(self, batch: list[_Row], start: float, end: float) -> None:
        for r in batch:
            if r.first:
                self._observer.queued((start - r.enqueued) * 1000)
        tokens = sum(len(r.ids) for r in batch)
        self._observer.batch_done(len(batch), tokens, (end - start) * 1000)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
