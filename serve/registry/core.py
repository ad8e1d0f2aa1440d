"""The registry actor: ``RegistryCore`` around the persisted ``RegistryState``, one named,
detached Ray actor per state directory in a cluster.

Replicas *watch* it with a long poll: ``watch(replica, version)`` returns at once when the
registry is newer than ``version``, else when it changes or after a timeout; it returns the
changes since ``version`` (``("delta", version, changes)``), or every adapter when those are no
longer in memory (``("snapshot", version, refs)``), so a change costs each replica one small
message, whatever the number of adapters. Each call also
tells the registry which version that replica has applied and which adapters it holds, so an
admin call can wait until every live replica has applied its change (``wait_synced``) and
``GET /v1/adapters`` can say where each adapter is resident. The logic runs in plain asyncio
(unit tests drive it without Ray); ``get_or_create_registry`` makes it an actor.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from models.adapters.identity import AdapterRef
from serve.registry.state import RegistryState

REGISTRY_NAMESPACE = "loraserve"
WATCH_TIMEOUT_S = 5.0
LIVE_AFTER_S = 3 * WATCH_TIMEOUT_S  # a replica unseen for longer no longer counts as live


@dataclass
class ReplicaView:
    version: int = 0
    resident: dict[str, list[str]] = field(default_factory=dict)  # model -> adapter names
    seen: float = field(default_factory=time.monotonic)


class RegistryCore:
    """The actor's logic, runnable in plain asyncio (unit tests drive it without Ray)."""

    def __init__(self, state_dir: str | None):
        self.state = RegistryState(Path(state_dir) if state_dir else None)
        self.replicas: dict[str, ReplicaView] = {}
        self._changed = asyncio.Event()
        self._acked = asyncio.Event()  # set when some replica reports a newer version

    def _bump(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def sync_config(self, refs: list[dict]) -> int:
        before = self.state.version
        version = self.state.sync_config([AdapterRef.from_dict(r) for r in refs])
        if version != before:
            self._bump()
        return version

    async def register(self, ref: dict, replace: bool = False) -> int:
        version = self.state.register(AdapterRef.from_dict(ref), replace)
        self._bump()
        return version

    async def unregister(self, name: str) -> int:
        _, version = self.state.unregister(name)
        self._bump()
        return version

    async def snapshot(self) -> tuple[int, list[dict]]:
        return self.state.snapshot()

    async def updates(self, version: int) -> tuple:
        """What a replica holding ``version`` needs: ``("delta", version, changes)``; when the
        changes are no longer in memory, ``("snapshot", version, refs)``; when the replica holds
        a version the registry never reached (its files were lost), ``("reset", version, refs)``,
        which the replica takes although it is older."""
        if version > self.state.version:  # the replica is ahead: the registry lost state (its files)
            return ("reset", *self.state.snapshot())
        changes = self.state.changes_since(version)
        if changes is None:
            return ("snapshot", *self.state.snapshot())
        return ("delta", self.state.version, changes)

    def _seen(self, replica: str, version: int, resident: dict | None) -> None:
        view = self.replicas.setdefault(replica, ReplicaView())
        if version > view.version:
            view.version = version
            self._acked.set()
            self._acked = asyncio.Event()
        view.seen = time.monotonic()
        if resident is not None:
            view.resident = resident

    async def watch(
        self, replica: str, version: int, resident: dict | None = None,
        timeout_s: float = WATCH_TIMEOUT_S,
    ) -> tuple | None:
        """``updates(version)`` when the registry is newer than ``version`` (now or within
        ``timeout_s``), else None."""
        self._seen(replica, version, resident)
        if self.state.version == version:
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), timeout_s)
            except TimeoutError:
                self._seen(replica, version, None)
                return None
        return await self.updates(version)

    async def report(self, replica: str, version: int, resident: dict) -> None:
        self._seen(replica, version, resident)

    async def forget(self, replica: str) -> None:
        self.replicas.pop(replica, None)

    def live(self) -> dict[str, ReplicaView]:
        now = time.monotonic()
        return {r: v for r, v in self.replicas.items() if now - v.seen <= LIVE_AFTER_S}

    async def wait_synced(self, version: int, timeout_s: float) -> dict:
        """Wait until every live replica has applied ``version``; say which did."""
        deadline = time.monotonic() + timeout_s
        while True:
            live = self.live()
            pending = sorted(r for r, v in live.items() if v.version < version)
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                synced = sorted(r for r, v in live.items() if v.version >= version)
                return {"version": version, "synced": synced, "pending": pending}
            try:  # woken by the next acknowledgement, not by polling
                await asyncio.wait_for(self._acked.wait(), min(left, 0.5))
            except TimeoutError:
                pass

    async def describe(self) -> list[dict]:
        """Every adapter with the live replicas that hold it now."""
        live = self.live()
        out = []
        for ref in sorted(self.state.adapters.values(), key=lambda r: r.name):
            holders = sorted(r for r, v in live.items() if ref.name in v.resident.get(ref.base, ()))
            out.append({**ref.to_dict(), "replicas": holders})
        return out


def registry_actor_class():
    """``RegistryCore`` as a Ray actor class (built lazily so this module imports without Ray)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=-1)(RegistryCore)


def registry_name(state_dir: Path) -> str:
    return "loraserve-adapters-" + hashlib.sha1(str(state_dir).encode()).hexdigest()[:10]


def get_or_create_registry(state_dir: Path):
    """The registry actor for this state directory: created by the first replica that asks,
    detached so it outlives any one replica; its state lives in the file anyway."""
    cls = registry_actor_class()
    return cls.options(
        name=registry_name(state_dir),
        namespace=REGISTRY_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
    ).remote(str(state_dir))
