"""A replica's side of the adapter registry: ``RegistryClient`` is the only code that calls the
registry actor. Lookups are local dict reads (no hop on the request path), kept current by a
long-poll watch loop that applies the registry's changes as deltas (a full snapshot only at
start or when this replica fell too far behind); a miss refreshes from the actor at most once
per ``miss_refresh_s``. Admin changes (register, unregister, config sync) go through it too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from models.adapters.identity import AdapterRef

log = logging.getLogger("loraserve")


class RegistryClient:
    """A replica's view of the registry, kept current by a long-poll watch loop.

    ``on_change(changed)`` runs on the event loop after each update is applied, with
    ``{name: (old ref or None, new ref or None)}`` for the adapters that changed (the
    ModelServers drop adapters that were unregistered or replaced); ``adapters`` is updated in
    place, so a reference to it stays current; ``resident()`` tells the
    registry which adapters this replica holds, sent with every watch call and, when it
    changes, at most every ``report_every_s``.
    """

    def __init__(
        self,
        actor,
        replica: str,
        *,
        on_change: Callable[[dict], None] | None = None,
        resident: Callable[[], dict[str, list[str]]] = dict,
        miss_refresh_s: float = 1.0,
        report_every_s: float = 0.5,
    ):
        self.actor = actor
        self.replica = replica
        self.on_change = on_change
        self.resident = resident
        self.adapters: dict[str, AdapterRef] = {}
        self.version = -1
        self.miss_refresh_s = miss_refresh_s
        self.report_every_s = report_every_s
        self._last_refresh = 0.0
        self._task: asyncio.Task | None = None
        self._report_pending = False

    async def start(self) -> RegistryClient:
        self._apply(*(await self.actor.snapshot.remote()))
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    def _apply(self, version: int, refs: list[dict], reset: bool = False) -> None:
        """A full snapshot (``reset``: even an older one: the registry lost its state)."""
        if version <= self.version and not (reset and version != self.version):
            return
        new = {d["name"]: AdapterRef.from_dict(d) for d in refs}
        changed = {n: (self.adapters.get(n), new.get(n)) for n in self.adapters.keys() | new.keys()
                   if self.adapters.get(n) != new.get(n)}
        self.adapters.clear()
        self.adapters.update(new)
        self._applied(version, changed)

    def _apply_delta(self, version: int, changes: list) -> None:
        """The changes after ``self.version`` up to ``version``, in order."""
        if version <= self.version:
            return
        changed: dict[str, tuple] = {}
        for name, d in changes:
            old = self.adapters.get(name)
            if d is None:
                self.adapters.pop(name, None)
            else:
                self.adapters[name] = AdapterRef.from_dict(d)
            changed[name] = (changed[name][0] if name in changed else old, self.adapters.get(name))
        self._applied(version, changed)

    def _take(self, update: tuple) -> None:
        kind, version, payload = update
        if kind == "delta":
            self._apply_delta(version, payload)
        else:
            self._apply(version, payload, reset=kind == "reset")

    def _applied(self, version: int, changed: dict) -> None:
        self.version = version
        if self.on_change is not None and changed:
            try:
                self.on_change(changed)
            except Exception:  # a failing listener must not stop the watch loop
                log.exception("adapter registry listener failed")

    async def _loop(self) -> None:
        while True:
            try:
                result = await self.actor.watch.remote(self.replica, self.version, self.resident())
                if result is not None:
                    self._take(result)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # actor restarting: retry, keep serving the last view
                log.warning("adapter registry watch failed (%s); retrying", exc)
                await asyncio.sleep(1.0)

    async def lookup(self, name: str) -> AdapterRef | None:
        """Local first; on a miss, refresh from the actor (rate-limited) and look again."""
        ref = self.adapters.get(name)
        if ref is not None:
            return ref
        if time.monotonic() - self._last_refresh >= self.miss_refresh_s:
            await self.refresh()
        return self.adapters.get(name)

    async def refresh(self) -> None:
        self._last_refresh = time.monotonic()
        self._take(await self.actor.updates.remote(self.version))

    # -- changes (admin routes and config sync) -------------------------------------------------
    async def sync_config(self, refs: list[AdapterRef]) -> int:
        """Make the config-declared adapters exactly ``refs``; returns the registry version."""
        return await self.actor.sync_config.remote([r.to_dict() for r in refs])

    async def register(self, ref: AdapterRef, replace: bool = False) -> int:
        return await self.actor.register.remote(ref.to_dict(), replace)

    async def unregister(self, name: str) -> int:
        return await self.actor.unregister.remote(name)

    async def describe(self) -> list[dict]:
        """Every registered adapter with the live replicas that hold it now."""
        return await self.actor.describe.remote()

    async def synced(self, version: int, timeout_s: float) -> dict:
        """Wait until every live replica has applied ``version`` (at most ``timeout_s``); this
        replica applies it at once rather than on its next watch. Says which replicas did."""
        sync = await self.actor.wait_synced.remote(version, timeout_s)
        if self.version < version:
            await self.refresh()
        return sync

    def residency_changed(self) -> None:
        """Tell the registry soon (coalesced) that this replica's resident set changed."""
        if self._report_pending:
            return
        self._report_pending = True

        async def send():
            await asyncio.sleep(self.report_every_s)
            self._report_pending = False
            try:
                await self.actor.report.remote(self.replica, self.version, self.resident())
            except Exception as exc:
                log.warning("adapter residency report failed: %s", exc)

        asyncio.get_running_loop().create_task(send())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            self.actor.forget.remote(self.replica)
        except Exception:
            pass
