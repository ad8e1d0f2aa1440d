"""The registry's state: adapter name -> ``AdapterRef`` with a version number that grows with
every change, persisted as JSON (written atomically on every change) under the configured
state directory, so adapters registered at runtime survive a restart. Adapters declared in the
config are re-registered at every start (``sync_config``); runtime ones come back from the file.
No Ray here.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

from models.adapters.identity import AdapterRef
from models.errors import AdapterNotFound, Conflict

log = logging.getLogger("loraserve")

STATE_FILE = "adapters.json"
FORMAT = 1


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
