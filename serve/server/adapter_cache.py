"""A replica's resident LoRA adapters for one backend: a bounded LRU with in-use protection.

Policy:
- Lazy: an adapter is loaded the first time a request needs it (pinned ones at replica start).
  Concurrent requests for one adapter share one load (a single task; each waiter is shielded so
  one cancelled request does not cancel the load for the others).
- Bounded: at most ``capacity`` adapters stay resident. Making room evicts the least recently
  used adapter that is neither pinned nor in use; its memory is freed by the backend.
- In use: a request holds its adapter from before its rows are queued until its outputs are
  back (``acquire``/``release``), so no batch ever runs with an evicted adapter. When every
  resident adapter is pinned or in use, a load goes ahead above capacity and the surplus is
  evicted as soon as adapters are released.
- Dropped: an adapter unregistered or replaced in the registry is removed once idle; a
  replaced adapter's new content loads under a new key (name + content hash), so both copies
  coexist while old requests finish.
Loads and unloads themselves run wherever ``load``/``unload`` put them (the ModelServer runs
them on its model thread, between forward passes).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from models.adapters import AdapterRef

log = logging.getLogger("loraserve")


@dataclass
class _Entry:
    ref: AdapterRef
    users: int = 0
    doomed: bool = False  # unregistered or replaced: remove when idle


class AdapterCache:
    def __init__(
        self,
        capacity: int,
        load: Callable[[AdapterRef], Awaitable[None]],
        unload: Callable[[str], Awaitable[None]],
        *,
        observer=None,
        on_residency: Callable[[], None] | None = None,
    ):
        self.capacity = capacity
        self._load = load
        self._unload = unload
        self._observer = observer
        self._on_residency = on_residency
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._loading: dict[str, asyncio.Task] = {}
        self._unloading: set[asyncio.Task] = set()
        self._registered: dict[str, AdapterRef] | None = None  # as of the last sync
        self.loads = 0
        self.evictions = 0

    # -- what requests use -------------------------------------------------------------------
    async def acquire(self, ref: AdapterRef) -> str:
        """Make ``ref`` resident and mark it in use; returns the backend key for its rows."""
        key = ref.key
        waited = False
        while True:
            entry = self._entries.get(key)
            # a doomed entry still serves requests that were already waiting for its load
            if entry is not None and (not entry.doomed or waited):
                entry.users += 1
                self._entries.move_to_end(key)
                return key
            task = self._loading.get(key)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._load_one(ref))
                self._loading[key] = task
            await asyncio.shield(task)  # raises the load's error to every waiter
            waited = True

    def release(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.users -= 1
        if entry.users == 0:
            self._trim()

    # -- what the registry watcher calls -------------------------------------------------------
    def sync(self, registered: dict[str, AdapterRef]) -> None:
        """Drop every resident adapter that is no longer registered with the same content."""
        self._registered = registered
        for key, entry in list(self._entries.items()):
            current = registered.get(entry.ref.name)
            if current is None or current.key != key:
                entry.doomed = True
        self._trim()

    # -- introspection ---------------------------------------------------------------------
    def resident(self) -> list[str]:
        return [e.ref.name for e in self._entries.values() if not e.doomed]

    def in_use(self, key: str) -> int:
        entry = self._entries.get(key)
        return 0 if entry is None else entry.users

    # -- internals ---------------------------------------------------------------------------
    async def _load_one(self, ref: AdapterRef) -> None:
        start = time.perf_counter()
        try:
            await self._make_room()
            await self._load(ref)
        except BaseException:
            self._loading.pop(ref.key, None)
            if self._observer is not None:
                self._observer.adapter_load("error", (time.perf_counter() - start) * 1000)
            raise
        # Unregistered (or replaced) while it loaded: serve the requests already waiting for it,
        # then let it go like any dropped adapter.
        current = None if self._registered is None else self._registered.get(ref.name)
        doomed = self._registered is not None and (current is None or current.key != ref.key)
        self._entries[ref.key] = _Entry(ref, doomed=doomed)
        self._loading.pop(ref.key, None)
        self.loads += 1
        if self._observer is not None:
            self._observer.adapter_load("ok", (time.perf_counter() - start) * 1000)
        self._residency()

    def _victims(self, limit: int) -> list[str]:
        """Keys to evict so at most ``limit`` stay: doomed idle ones, then LRU idle unpinned."""
        idle = [k for k, e in self._entries.items() if e.users == 0]
        doomed = [k for k in idle if self._entries[k].doomed]
        lru = [k for k in idle if not self._entries[k].doomed and not self._entries[k].ref.pinned]
        excess = len(self._entries) - len(doomed) - limit
        return doomed + lru[: max(excess, 0)]

    async def _make_room(self) -> None:
        # Loads in flight will take slots too; leave room for them and for this one.
        limit = self.capacity - len(self._loading)
        for key in self._victims(max(limit, 0)):
            await self._evict(key)

    def _trim(self) -> None:
        victims = self._victims(self.capacity)
        for key in victims:
            task = asyncio.get_running_loop().create_task(self._evict(key))
            self._unloading.add(task)
            task.add_done_callback(self._unloading.discard)

    async def _evict(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.users:
            return
        del self._entries[key]  # first, so no new request picks it while it is being removed
        try:
            await self._unload(key)
        except Exception:
            log.exception("removing adapter %s failed", key)
        if not entry.doomed:
            self.evictions += 1
            if self._observer is not None:
                self._observer.adapter_evicted()
        self._residency()

    def _residency(self) -> None:
        if self._observer is not None:
            self._observer.adapters_resident(len(self._entries))
        if self._on_residency is not None:
            self._on_residency()
