"""The cluster-wide adapter registry: which adapters exist, on which base, from which files.

Three parts:
- ``RegistryState`` (no Ray): name -> ``AdapterRef`` with a version number, persisted as JSON
  (written atomically on every change) under the configured state directory, so adapters
  registered at runtime survive a restart. Adapters declared in the config are re-registered
  at every start (``sync_config``); runtime ones come back from the file.
- ``AdapterRegistry``: a named, detached Ray actor around the state; one per state directory
  in a cluster. Replicas *watch* it with a long poll: ``watch(replica, version)`` returns at
  once when the registry is newer than ``version``, else when it changes or after a timeout.
  Each call also tells the registry which version that replica has applied and which adapters
  it holds, so an admin call can wait until every live replica has applied its change
  (``wait_synced``) and ``GET /v1/adapters`` can say where each adapter is resident.
- ``RegistryClient``: the replica side. Lookups are local dict reads (no hop on the request
  path); a miss refreshes from the actor at most once per ``miss_refresh_s``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from models.adapters import AdapterRef
from models.errors import AdapterNotFound, Conflict

log = logging.getLogger("loraserve")

STATE_FILE = "adapters.json"
FORMAT = 1
REGISTRY_NAMESPACE = "loraserve"
WATCH_TIMEOUT_S = 5.0
LIVE_AFTER_S = 3 * WATCH_TIMEOUT_S  # a replica unseen for longer no longer counts as live


class RegistryState:
    """Adapters by name, a version that grows with every change, and the JSON file."""

    def __init__(self, state_dir: Path | None):
        self.file = None if state_dir is None else Path(state_dir) / STATE_FILE
        self.adapters: dict[str, AdapterRef] = {}
        self.version = 0
        if self.file is not None and self.file.exists():
            self._read()

    def _read(self) -> None:
        try:
            data = json.loads(self.file.read_text())
            refs = [AdapterRef.from_dict(d) for d in data["adapters"]]
            self.version = int(data.get("version", 0))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Keep the damaged file for a human, start empty, and say so loudly.
            aside = self.file.with_suffix(f".corrupt-{int(time.time())}")
            self.file.rename(aside)
            log.error("adapter registry file %s is unreadable (%s); moved to %s", self.file, exc, aside)
            return
        self.adapters = {r.name: r for r in refs}

    def _write(self) -> None:
        if self.file is None:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "format": FORMAT,
            "version": self.version,
            "adapters": [r.to_dict() for r in sorted(self.adapters.values(), key=lambda r: r.name)],
        }
        fd, tmp = tempfile.mkstemp(dir=self.file.parent, prefix=".adapters-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(body, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.file)

    def _changed(self) -> int:
        self.version += 1
        self._write()
        return self.version

    def sync_config(self, refs: list[AdapterRef]) -> int:
        """Make the config-declared adapters exactly ``refs``; runtime ones are kept unless a
        config adapter now claims their name."""
        wanted = {r.name: r for r in refs}
        current = {n: r for n, r in self.adapters.items() if r.origin == "config"}
        clashes = [n for n in wanted if n in self.adapters and self.adapters[n].origin != "config"]
        for n in clashes:
            log.warning("config adapter %r replaces the runtime adapter of that name", n)
        if current == wanted and not clashes:
            return self.version
        for n in current:
            self.adapters.pop(n)
        self.adapters.update(wanted)
        return self._changed()

    def register(self, ref: AdapterRef, replace: bool = False) -> int:
        old = self.adapters.get(ref.name)
        if old is not None:
            if not replace:
                raise Conflict(
                    f"adapter {ref.name!r} is already registered (on {old.base!r}); unload it "
                    "first or send replace: true",
                    param="lora_name",
                )
            if old.origin == "config":
                raise Conflict(
                    f"adapter {ref.name!r} is declared in the service config; change it there",
                    param="lora_name",
                )
        self.adapters[ref.name] = ref
        return self._changed()

    def unregister(self, name: str) -> tuple[AdapterRef, int]:
        ref = self.adapters.get(name)
        if ref is None:
            raise AdapterNotFound(f"no adapter named {name!r} is registered", param="lora_name")
        if ref.origin == "config":
            raise Conflict(
                f"adapter {name!r} is declared in the service config; remove it there",
                param="lora_name",
            )
        del self.adapters[name]
        return ref, self._changed()

    def snapshot(self) -> tuple[int, list[dict]]:
        return self.version, [r.to_dict() for r in self.adapters.values()]


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

    def _seen(self, replica: str, version: int, resident: dict | None) -> None:
        view = self.replicas.setdefault(replica, ReplicaView())
        view.version = max(view.version, version)
        view.seen = time.monotonic()
        if resident is not None:
            view.resident = resident

    async def watch(
        self, replica: str, version: int, resident: dict | None = None,
        timeout_s: float = WATCH_TIMEOUT_S,
    ) -> tuple[int, list[dict]] | None:
        """The snapshot when newer than ``version`` (now or within ``timeout_s``), else None."""
        self._seen(replica, version, resident)
        if self.state.version == version:
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                self._seen(replica, version, None)
                return None
        return self.state.snapshot()

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
            if not pending or time.monotonic() >= deadline:
                synced = sorted(r for r, v in live.items() if v.version >= version)
                return {"version": version, "synced": synced, "pending": pending}
            await asyncio.sleep(0.01)

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
    import hashlib

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


class RegistryClient:
    """A replica's view of the registry, kept current by a long-poll watch loop.

    ``on_change(old, new)`` runs on the event loop after each new snapshot is applied (the
    ModelServers drop adapters that were unregistered or replaced); ``resident()`` tells the
    registry which adapters this replica holds, sent with every watch call and, when it
    changes, at most every ``report_every_s``.
    """

    def __init__(
        self,
        actor,
        replica: str,
        *,
        on_change: Callable[[dict, dict], None] | None = None,
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

    async def start(self) -> "RegistryClient":
        self._apply(*(await self.actor.snapshot.remote()))
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    def _apply(self, version: int, refs: list[dict]) -> None:
        if version <= self.version:
            return
        old = self.adapters
        self.adapters = {d["name"]: AdapterRef.from_dict(d) for d in refs}
        self.version = version
        if self.on_change is not None:
            try:
                self.on_change(old, self.adapters)
            except Exception:  # a failing listener must not stop the watch loop
                log.exception("adapter registry listener failed")

    async def _loop(self) -> None:
        while True:
            try:
                result = await self.actor.watch.remote(self.replica, self.version, self.resident())
                if result is not None:
                    self._apply(*result)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # actor restarting: retry, keep serving the last view
                log.warning("adapter registry watch failed (%s); retrying", exc)
                await asyncio.sleep(1.0)

    def get(self, name: str) -> AdapterRef | None:
        return self.adapters.get(name)

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
        self._apply(*(await self.actor.snapshot.remote()))

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
