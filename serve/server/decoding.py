"""The replica's decode loop: drives a ``DecodeEngine`` one step at a time on one worker thread
and hands each request its text deltas as they are produced.

Requests never touch the engine: ``submit`` queues new sequences (refusing with ``Overloaded``,
503, when the waiting room is full) and ``cancel`` marks sequences to drop; both are passed to
the next ``engine.step`` on the worker thread, so the engine needs no lock. New sequences are
also taken between a step's passes (the engine's ``intake``, under a small lock shared with
``submit``), so a request that arrives during a prefill pass does not wait for the decode pass.
While any sequence is running or waiting the loop runs steps back to back; idle, it sleeps until
a submit wakes it.
A stream whose consumer went away (a client disconnect cancels the request's task) cancels its
sequences, which leave the batch at the next step, freeing their slots.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from models.decoding.engine import DecodeEngine, Delta, GenSeq
from models.errors import Overloaded, ServiceError


class Stream:
    """The deltas of one request's sequences (one per choice), in order, ending when each has
    finished. Closing it early cancels what has not finished."""

    def __init__(self, loop: DecodeLoop, seqs: Sequence[GenSeq]):
        self._loop = loop
        self.seqs = list(seqs)
        self.queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.on_end = None  # called once when the stream has ended (finished or closed)
        self._open = len(self.seqs)

    def __aiter__(self):
        return self

    async def __anext__(self) -> Delta:
        if self._open == 0:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self._open = 0
            self._end()
            raise item
        if item.finish is not None:
            self._open -= 1
            if self._open == 0:
                self._end()
        return item

    def close(self) -> None:
        """Cancel every sequence of this stream that has not finished (idempotent)."""
        if self._open:
            self._open = 0
            self._loop.cancel([s.id for s in self.seqs if s.finish is None])
        self._end()

    def _end(self) -> None:
        end, self.on_end = self.on_end, None
        if end is not None:
            end()


class DecodeLoop:
    def __init__(self, engine: DecodeEngine, observer=None, name: str = "decode"):
        self.engine = engine
        self._observer = observer
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: list[GenSeq] = []  # submitted, not yet admitted (guarded by _lock)
        self._lock = threading.Lock()
        self._cancel: set[int] = set()
        self._streams: dict[int, Stream] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._busy_since: float | None = None

    def submit(self, seqs: Sequence[GenSeq]) -> Stream:
        e = self.engine
        with self._lock:
            if e.load() + len(self._pending) + len(seqs) > e.max_running + e.max_waiting:
                raise Overloaded(
                    f"generation is at capacity ({len(e.running)} sequences running, {self.waiting} "
                    f"waiting); retry shortly"
                )
            stream = Stream(self, seqs)
            for s in seqs:
                self._streams[s.id] = stream
            self._pending.extend(seqs)
        self._ensure_task()
        self._wake.set()
        return stream

    def cancel(self, ids: Sequence[int]) -> None:
        for i in ids:
            self._streams.pop(i, None)
        self._cancel.update(ids)
        if self._wake is not None:
            self._wake.set()

    @property
    def waiting(self) -> int:
        return len(self.engine.waiting) + len(self._pending)

    def alive(self, stuck_s: float) -> bool:
        busy = self._busy_since
        if busy is not None and time.perf_counter() - busy > stuck_s:
            return False
        return self._task is None or not self._task.done()

    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _intake(self) -> None:
        """On the worker thread, between passes: admit what was submitted (``submit`` checked
        the capacity under the same lock, so ``admit`` does not refuse)."""
        with self._lock:
            new, self._pending = self._pending, []
            if new:
                self.engine.admit(new)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not (self.engine.busy or self._pending or self._cancel):
                self._wake.clear()
                await self._wake.wait()
            cancel, self._cancel = self._cancel, set()
            start = self._busy_since = time.perf_counter()
            early = lambda ds: loop.call_soon_threadsafe(self._deliver, ds)  # noqa: E731  first tokens
            try:
                deltas = await loop.run_in_executor(self._executor, self.engine.step, cancel, early, self._intake)
            except Exception as exc:  # the step failed: every stream in it learns why
                self._busy_since = None
                self._fail(exc)
                continue
            self._busy_since = None
            now = time.perf_counter()
            self._deliver(deltas)
            if self._observer is not None:
                loop.call_soon(self._observer.decode_step, len(self.engine.running),
                               self.waiting, self.engine.kv_usage(), (now - start) * 1000)

    def _deliver(self, deltas: list[Delta]) -> None:
        now = time.perf_counter()
        for d in deltas:
            stream = self._streams.get(d.seq.id)
            if stream is None:
                continue
            if d.token is not None:
                if stream.first_token is None:
                    stream.first_token = now
                stream.last_token = now
            if d.finish is not None:
                del self._streams[d.seq.id]
            stream.queue.put_nowait(d)

    def _fail(self, exc: Exception) -> None:
        """A failed step leaves the engine's state unknown: end every sequence, clear it."""
        err = exc if isinstance(exc, ServiceError) else RuntimeError(f"generation step failed: {exc}")
        with self._lock:
            self._pending.clear()  # their streams are told below too
        streams = set(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream.queue.put_nowait(err)
        e = self.engine
        for s in (*e.running, *e.prefilling, *e.waiting):
            s.finish = "abort"
        e.running.clear()
        e.prefilling.clear()
        e.waiting.clear()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
