"""The per-replica adapter LRU as a state machine (no model: load/unload are recorded seams)."""

import asyncio

from models.adapters import AdapterRef
from serve.server.adapter_cache import AdapterCache


def ref(name, sha="a" * 64, pinned=False):
    return AdapterRef(name=name, base="b", path=f"/x/{name}", rank=4, sha256=sha, task="embed", pinned=pinned)


class Backend:
    def __init__(self, load_s=0.0, fail=()):
        self.loaded, self.calls, self.load_s, self.fail = set(), [], load_s, set(fail)

    async def load(self, r):
        self.calls.append(("load", r.key))
        await asyncio.sleep(self.load_s)
        if r.name in self.fail:
            raise RuntimeError("broken")
        self.loaded.add(r.key)

    async def unload(self, key):
        self.calls.append(("unload", key))
        self.loaded.discard(key)


def cache(capacity, **kw):
    b = Backend(**kw)
    return AdapterCache(capacity, b.load, b.unload), b


def run(coro):
    return asyncio.run(coro)


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_concurrent_requests_share_one_load():
    async def main():
        c, b = cache(4, load_s=0.01)
        keys = await asyncio.gather(*(c.acquire(ref("x")) for _ in range(10)))
        assert len(set(keys)) == 1 and b.calls == [("load", keys[0])] and c.in_use(keys[0]) == 10
    run(main())


def test_lru_evicts_least_recently_used_idle_and_frees_it():
    async def main():
        c, b = cache(2)
        for n in ("a", "b"):
            c.release(await c.acquire(ref(n)))
        c.release(await c.acquire(ref("a")))  # a is now more recent than b
        c.release(await c.acquire(ref("c")))
        await settle()
        assert sorted(c.resident()) == ["a", "c"] and ref("b").key not in b.loaded
        assert c.evictions == 1
    run(main())


def test_in_use_and_pinned_are_never_evicted():
    async def main():
        c, b = cache(2)
        held = await c.acquire(ref("busy"))
        c.release(await c.acquire(ref("pin", pinned=True)))
        new = await c.acquire(ref("new"))  # over capacity: nothing evictable, load anyway
        await settle()
        assert sorted(c.resident()) == ["busy", "new", "pin"]
        c.release(held)  # now the surplus goes: the idle, unpinned LRU one
        await settle()
        assert sorted(c.resident()) == ["new", "pin"] and held not in b.loaded
        c.release(new)
        await settle()
        assert sorted(c.resident()) == ["new", "pin"]
    run(main())


def test_unregistered_adapter_is_dropped_only_when_idle():
    async def main():
        c, b = cache(4)
        key = await c.acquire(ref("gone"))
        c.sync({})
        await settle()
        assert key in b.loaded  # a request still uses it
        c.release(key)
        await settle()
        assert key not in b.loaded and c.resident() == [] and c.evictions == 0
    run(main())


def test_replaced_adapter_loads_beside_the_old_copy():
    async def main():
        c, b = cache(4)
        old = await c.acquire(ref("x", sha="1" * 64))
        new_ref = ref("x", sha="2" * 64)
        c.sync({"x": new_ref})
        new = await c.acquire(new_ref)
        assert old != new and {old, new} <= b.loaded
        c.release(old)
        await settle()
        assert old not in b.loaded and new in b.loaded
    run(main())


def test_failed_load_reaches_every_waiter_and_is_retried_later():
    async def main():
        c, b = cache(4, load_s=0.01, fail={"bad"})
        results = await asyncio.gather(*(c.acquire(ref("bad")) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results) and b.calls == [("load", ref("bad").key)]
        b.fail.clear()
        assert await c.acquire(ref("bad")) == ref("bad").key
    run(main())


def test_cancelled_waiter_does_not_cancel_the_shared_load():
    async def main():
        c, b = cache(4, load_s=0.05)
        first = asyncio.ensure_future(c.acquire(ref("x")))
        while not b.calls:  # the shared load has started
            await asyncio.sleep(0)
        second = asyncio.ensure_future(c.acquire(ref("x")))
        first.cancel()
        assert await second == ref("x").key and ref("x").key in b.loaded
    run(main())


def test_unregistered_while_loading_serves_its_waiters_then_goes():
    async def main():
        c, b = cache(4, load_s=0.05)
        c.sync({"x": ref("x")})
        waiter = asyncio.ensure_future(c.acquire(ref("x")))
        while not b.calls:  # the load is in flight
            await asyncio.sleep(0)
        c.sync({})  # unloaded while the load is in flight
        key = await waiter
        assert key in b.loaded  # the waiting request is served
        c.release(key)
        await settle()
        assert key not in b.loaded and c.resident() == []
    run(main())
