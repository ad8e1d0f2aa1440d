"""The adapter registry without Ray: persistence, conflicts, config sync, watch and sync."""

import asyncio
import json

import pytest

from models.adapters import AdapterRef
from models.errors import AdapterNotFound, Conflict
from serve.metrics import OTHER_ADAPTERS, AdapterLabels
from serve.registry.core import RegistryCore
from serve.registry.state import RegistryState


def ref(name, origin="runtime", sha="a" * 64):
    return AdapterRef(name=name, base="minilm", path=f"/s/{name}", rank=8, sha256=sha, task="classify",
                      labels=("neg", "pos"), origin=origin)


def test_runtime_adapters_survive_a_restart(tmp_path):
    s = RegistryState(tmp_path)
    s.register(ref("a"))
    s.register(ref("b"))
    s.unregister("b")
    again = RegistryState(tmp_path)
    assert set(again.adapters) == {"a"} and again.adapters["a"] == ref("a") and again.version == s.version


def test_name_taken_is_a_conflict_unless_replace(tmp_path):
    s = RegistryState(tmp_path)
    s.register(ref("a"))
    with pytest.raises(Conflict):
        s.register(ref("a", sha="b" * 64))
    s.register(ref("a", sha="b" * 64), replace=True)
    assert s.adapters["a"].sha256 == "b" * 64
    with pytest.raises(AdapterNotFound):
        s.unregister("nope")


def test_config_adapters_are_resynced_and_protected(tmp_path):
    s = RegistryState(tmp_path)
    s.register(ref("runtime-one"))
    v = s.sync_config([ref("cfg", origin="config")])
    assert s.sync_config([ref("cfg", origin="config")]) == v  # unchanged: no new version
    with pytest.raises(Conflict):
        s.unregister("cfg")
    with pytest.raises(Conflict):
        s.register(ref("cfg"), replace=True)
    s.sync_config([])  # removed from the config: gone; runtime ones stay
    assert set(RegistryState(tmp_path).adapters) == {"runtime-one"}


def test_corrupt_state_file_is_kept_aside_not_lost(tmp_path):
    (tmp_path / "adapters.json").write_text("{not json")
    s = RegistryState(tmp_path)
    assert s.adapters == {} and list(tmp_path.glob("adapters.corrupt-*"))


def test_state_files_are_plain_json(tmp_path):
    s = RegistryState(tmp_path)
    s.register(ref("a"))
    line = json.loads((tmp_path / "adapters.log").read_text())
    assert line["version"] == s.version and line["ref"]["name"] == "a"
    s.compact()
    data = json.loads((tmp_path / "adapters.json").read_text())
    assert data["format"] == 1 and data["adapters"][0]["name"] == "a" and data["version"] == s.version
    assert (tmp_path / "adapters.log").read_text() == ""


def test_a_change_appends_one_line_and_the_log_is_compacted(tmp_path):
    s = RegistryState(tmp_path, compact_after=5)
    for i in range(4):
        s.register(ref(f"a{i}"))
    assert not (tmp_path / "adapters.json").exists() and s.log_lines == 4
    s.unregister("a0")  # the fifth line: snapshot written, log emptied
    assert s.log_lines == 0 and (tmp_path / "adapters.log").read_text() == ""
    s.register(ref("b"))
    again = RegistryState(tmp_path)
    assert set(again.adapters) == {"a1", "a2", "a3", "b"} and again.version == s.version


def test_log_lines_the_snapshot_holds_are_skipped_and_a_torn_line_dropped(tmp_path):
    s = RegistryState(tmp_path)
    s.register(ref("a"))
    s.register(ref("b"))
    kept = (tmp_path / "adapters.log").read_text()
    s.compact()  # as if the process died after writing the snapshot, before emptying the log
    (tmp_path / "adapters.log").write_text(kept)
    s2 = RegistryState(tmp_path)
    s2.unregister("a")
    with open(tmp_path / "adapters.log", "a") as fh:
        fh.write('{"version": 99, "name": "c", "re')  # a crash while appending
    again = RegistryState(tmp_path)
    assert set(again.adapters) == {"b"} and again.version == s2.version


def test_watchers_get_the_changes_since_their_version_or_a_snapshot(tmp_path):
    s = RegistryState(tmp_path, journal_versions=3)
    v0 = s.version
    s.register(ref("a"))
    s.register(ref("b"))
    assert s.changes_since(v0) == [("a", ref("a").to_dict()), ("b", ref("b").to_dict())]
    assert s.changes_since(s.version) == []
    s.unregister("a")
    s.sync_config([ref("cfg", origin="config")])
    assert s.changes_since(v0) is None  # older than the journal: take a snapshot
    assert s.changes_since(s.version - 2) == [("a", None), ("cfg", ref("cfg", origin="config").to_dict())]


def test_watch_returns_on_change_and_sync_waits_for_every_live_replica(tmp_path):
    async def main():
        core = RegistryCore(str(tmp_path))
        v0 = core.state.version
        waiting = asyncio.ensure_future(core.watch("r1", v0, {}, timeout_s=5))
        assert await core.watch("r2", v0, {}, timeout_s=0.01) is None  # nothing new yet
        v1 = await core.register(ref("a").to_dict())
        kind, version, changes = await asyncio.wait_for(waiting, 1)
        assert (kind, version, changes) == ("delta", v1, [("a", ref("a").to_dict())])
        sync = await core.wait_synced(v1, timeout_s=0.05)  # neither replica acked v1 yet
        assert sync["pending"] == ["r1", "r2"]
        await core.report("r1", v1, {"minilm": ["a"]})
        await core.report("r2", v1, {})
        sync = await core.wait_synced(v1, timeout_s=1)
        assert sync["synced"] == ["r1", "r2"] and sync["pending"] == []
        (row,) = await core.describe()
        assert row["replicas"] == ["r1"]
    asyncio.run(main())


def test_adapter_labels_are_bounded_top_n():
    now = [0.0]
    labels = AdapterLabels(2, window_s=10, pinned=("pin",), clock=lambda: now[0])
    assert labels(None) == "none" and labels("pin") == "pin"
    assert labels("a") == "a" and labels("b") == OTHER_ADAPTERS  # only 2 slots
    for _ in range(5):
        labels("b")
    now[0] = 11  # re-rank: b is now more popular than a
    assert labels("b") == "b" and labels("a") == OTHER_ADAPTERS
    emitted = {labels(f"x{i}") for i in range(100)}
    assert emitted == {OTHER_ADAPTERS}


class _Actor:
    """The registry actor's handle shape (``actor.method.remote(...)`` awaited), over a core
    in this event loop: the seam the client is tested through without Ray."""

    def __init__(self, core):
        self.core = core

    def __getattr__(self, name):
        method = getattr(self.core, name)
        return type("M", (), {"remote": staticmethod(lambda *a, **k: asyncio.ensure_future(method(*a, **k)))})


def test_the_client_applies_deltas_in_place_and_reports_what_changed(tmp_path):
    from serve.registry.client import RegistryClient

    async def main():
        core = RegistryCore(str(tmp_path))
        await core.register(ref("a").to_dict())
        seen = []
        client = await RegistryClient(_Actor(core), "r1", on_change=seen.append).start()
        view = client.adapters
        assert set(view) == {"a"}
        for _ in range(100):  # until the client's first watch call has made it a live replica
            if "r1" in core.replicas:
                break
            await asyncio.sleep(0)
        assert "r1" in core.replicas
        await core.register(ref("b").to_dict())
        await core.register(ref("a", sha="b" * 64).to_dict(), replace=True)
        await core.unregister("b")
        sync = await core.wait_synced(core.state.version, timeout_s=2)
        assert sync["synced"] == ["r1"] and client.version == core.state.version
        assert client.adapters is view and set(view) == {"a"} and view["a"].sha256 == "b" * 64
        assert seen[0] == {"a": (None, ref("a"))}  # the snapshot at start
        first, last = {}, {}
        for update in seen[1:]:
            for name, (old, new) in update.items():
                first.setdefault(name, old)
                last[name] = new
        assert first == {"b": None, "a": ref("a")} and last == {"b": None, "a": ref("a", sha="b" * 64)}
        client.close()
    asyncio.run(main())


def test_a_damaged_log_line_before_the_end_sets_the_log_aside(tmp_path):
    s = RegistryState(tmp_path)
    s.register(ref("a"))
    s.compact()
    s.register(ref("b"))
    s.register(ref("c"))
    lines = (tmp_path / "adapters.log").read_text().splitlines()
    (tmp_path / "adapters.log").write_text("garbage\n" + lines[1] + "\n")
    again = RegistryState(tmp_path)
    assert set(again.adapters) == {"a"} and list(tmp_path.glob("adapters.log.corrupt-*"))


def test_a_replica_ahead_of_a_registry_that_lost_its_files_takes_its_state(tmp_path):
    from serve.registry.client import RegistryClient

    async def main():
        core = RegistryCore(str(tmp_path / "old"))
        for name in ("a", "b", "c"):
            await core.register(ref(name).to_dict())
        client = await RegistryClient(_Actor(core), "r1").start()
        assert client.version == 3
        client.actor = _Actor(RegistryCore(str(tmp_path / "new")))  # the state dir was lost
        await client.actor.core.register(ref("z").to_dict())
        kind, version, refs = await client.actor.core.watch("r1", client.version, {}, timeout_s=0.01)
        assert (kind, version) == ("reset", 1)
        client._take((kind, version, refs))
        assert set(client.adapters) == {"z"} and client.version == 1  # not stuck at 3, looping
        client.close()
    asyncio.run(main())
