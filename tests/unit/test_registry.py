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


def test_state_file_is_plain_json(tmp_path):
    RegistryState(tmp_path).register(ref("a"))
    data = json.loads((tmp_path / "adapters.json").read_text())
    assert data["format"] == 1 and data["adapters"][0]["name"] == "a"


def test_watch_returns_on_change_and_sync_waits_for_every_live_replica(tmp_path):
    async def main():
        core = RegistryCore(str(tmp_path))
        v0 = core.state.version
        waiting = asyncio.ensure_future(core.watch("r1", v0, {}, timeout_s=5))
        assert await core.watch("r2", v0, {}, timeout_s=0.01) is None  # nothing new yet
        v1 = await core.register(ref("a").to_dict())
        version, refs = await asyncio.wait_for(waiting, 1)
        assert version == v1 and refs[0]["name"] == "a"
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
