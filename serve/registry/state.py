"""The registry's state: adapter name -> ``AdapterRef`` with a version number that grows with
every change, persisted under the configured state directory so adapters registered at runtime
survive a restart. Adapters declared in the config are re-registered at every start
(``sync_config``); runtime ones come back from the files. No Ray here.

Persistence is a snapshot plus a journal, so a change costs one small append, not a rewrite of
every adapter (at 10,000 adapters the snapshot is megabytes):

- ``adapters.log``: one JSON line per change (``{"version", "name", "ref"}``, ``ref`` null for
  a removal), appended and fsynced before the change is acknowledged;
- ``adapters.json``: every adapter as of ``version``, rewritten atomically (temp file, fsync,
  rename) once the log holds ``compact_after`` lines, after which the log is emptied. A crash
  between the two leaves log lines the snapshot already holds; replay skips them by version.

On start: the snapshot, then the log lines newer than it. A torn last line (a crash while
appending) is dropped with a warning; an unreadable file is moved aside (``.corrupt-<time>``)
and the registry starts from what it could read, with an error in the log.

Recent changes are also kept in memory (``changes_since``), so watchers get the changes since
the version they hold instead of every adapter again.
"""

from __future__ import annotations

import collections
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
LOG_FILE = "adapters.log"
FORMAT = 1
COMPACT_AFTER = 1000  # log lines before the snapshot is rewritten and the log emptied
JOURNAL_VERSIONS = 4096  # versions whose changes stay in memory for watchers

Change = tuple[str, dict | None]  # (adapter name, its ref as a dict; None: removed)


class RegistryState:
    """Adapters by name, a version that grows with every change, the snapshot and the log."""

    def __init__(self, state_dir: Path | None, compact_after: int = COMPACT_AFTER,
                 journal_versions: int = JOURNAL_VERSIONS):
        self.file = None if state_dir is None else Path(state_dir) / STATE_FILE
        self.log_file = None if state_dir is None else Path(state_dir) / LOG_FILE
        self.compact_after = compact_after
        self.adapters: dict[str, AdapterRef] = {}
        self.version = 0
        self.journal: collections.deque[tuple[int, list[Change]]] = collections.deque(maxlen=journal_versions)
        self.log_lines = 0
        self.snapshot_version = 0  # the version adapters.json holds
        if self.file is not None:
            if self.file.exists():
                self._read_snapshot()
            if self.log_file.exists():
                self._replay_log()

    # -- reading ---------------------------------------------------------------------------------
    def _aside(self, path: Path, exc: Exception) -> None:
        """Keep a damaged file for a human and say so loudly."""
        name = path.stem if path == self.file else path.name  # adapters.corrupt-*, adapters.log.corrupt-*
        aside = path.with_name(f"{name}.corrupt-{int(time.time())}")
        path.rename(aside)
        log.error("adapter registry file %s is unreadable (%s); moved to %s", path, exc, aside)

    def _read_snapshot(self) -> None:
        try:
            data = json.loads(self.file.read_text())
            refs = [AdapterRef.from_dict(d) for d in data["adapters"]]
            self.version = self.snapshot_version = int(data.get("version", 0))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._aside(self.file, exc)
            return
        self.adapters = {r.name: r for r in refs}

    def _replay_log(self) -> None:
        lines = self.log_file.read_text().splitlines()
        for i, line in enumerate(lines):
            try:
                entry = json.loads(line)
                version, name, d = int(entry["version"]), entry["name"], entry["ref"]
                ref = None if d is None else AdapterRef.from_dict(d)
            except (ValueError, KeyError, TypeError) as exc:
                if i == len(lines) - 1:  # torn by a crash while appending: never acknowledged
                    log.warning("adapter registry log %s: dropped a torn last line", self.log_file)
                    break
                self._aside(self.log_file, exc)
                return
            self.log_lines += 1
            if version <= self.snapshot_version:
                continue  # the snapshot already holds it (a crash between compaction's steps)
            if ref is None:
                self.adapters.pop(name, None)
            else:
                self.adapters[name] = ref
            self.version = max(self.version, version)

    # -- writing ---------------------------------------------------------------------------------
    def _append(self, version: int, changes: list[Change]) -> None:
        if self.log_file is None:
            return
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps({"version": version, "name": n, "ref": d}) + "\n" for n, d in changes)
        with open(self.log_file, "a") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        self.log_lines += len(changes)
        if self.log_lines >= self.compact_after:
            self.compact()

    def compact(self) -> None:
        """Rewrite the snapshot as of now, then empty the log."""
        if self.file is None:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "format": FORMAT,
            "version": self.version,
            "adapters": [r.to_dict() for r in sorted(self.adapters.values(), key=lambda r: r.name)],
        }
        _atomic_write(self.file, json.dumps(body, indent=1))
        self.snapshot_version = self.version
        _atomic_write(self.log_file, "")
        self.log_lines = 0

    def _changed(self, changes: list[Change]) -> int:
        self.version += 1
        self.journal.append((self.version, changes))
        self._append(self.version, changes)
        return self.version

    # -- changes -----------------------------------------------------------------------------------
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
        changes: list[Change] = [(n, None) for n in current if n not in wanted]
        changes += [(n, r.to_dict()) for n, r in wanted.items() if self.adapters.get(n) != r]
        for n in current:
            self.adapters.pop(n)
        self.adapters.update(wanted)
        return self._changed(changes)

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
        return self._changed([(ref.name, ref.to_dict())])

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
        return ref, self._changed([(name, None)])

    # -- reading by watchers -------------------------------------------------------------------
    def snapshot(self) -> tuple[int, list[dict]]:
        return self.version, [r.to_dict() for r in self.adapters.values()]

    def changes_since(self, version: int) -> list[Change] | None:
        """Every change after ``version``, in order; None when they are no longer in memory (the
        watcher then takes a snapshot)."""
        if version == self.version:
            return []
        if version > self.version or not self.journal or self.journal[0][0] > version + 1:
            return None
        return [c for v, changes in self.journal if v > version for c in changes]


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
