"""The batcher as a state machine: what each forward pass receives, and failure isolation."""

import asyncio

import numpy as np
import pytest

from models.errors import Overloaded
from models.spec import BatchingSpec
from serve.server.batching import Batcher
from tests.waiting import async_wait_until


class RecordingModel:
    """Echoes each row's first id; records every batch it was given (a seam, not the model)."""

    def __init__(self, fail_on=None):
        self.batches = []
        self.adapters = []
        self.entered = __import__("threading").Event()  # a forward pass has started
        self.fail_on = fail_on
        self.gate = None

    def __call__(self, rows, adapters=None):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append([list(r) for r in rows])
        self.adapters.append(adapters)
        if self.fail_on is not None and any(r[0] == self.fail_on for r in rows):
            raise ValueError("bad batch")
        return np.array([[float(r[0])] for r in rows], dtype=np.float32)


class Observed:
    def __init__(self):
        self.sizes, self.waits = [], []

    def batch_done(self, rows, tokens, inference_ms):
        self.sizes.append(rows)

    def queued(self, wait_ms):
        self.waits.append(wait_ms)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_a_forward_pass_and_get_their_own_rows():
    async def main():
        model = RecordingModel()
        obs = Observed()
        b = Batcher(model, BatchingSpec(max_batch_size=64, max_wait_ms=20), obs)
        outs = await asyncio.gather(*(b.submit([[i], [i + 100]]) for i in range(10)))
        return model, obs, outs

    model, obs, outs = run(main())
    for i, out in enumerate(outs):
        assert out.tolist() == [[i], [i + 100]]
    assert len(model.batches) == 1 and len(model.batches[0]) == 20
    assert obs.sizes == [20] and len(obs.waits) == 10  # one queue wait per request


def test_batches_respect_max_size_and_token_budget():
    async def main():
        model = RecordingModel()
        b = Batcher(model, BatchingSpec(max_batch_size=4, max_wait_ms=20, max_batch_tokens=12))
        rows = [[i] * 3 for i in range(10)]  # 3 tokens each -> at most 4 rows by tokens too
        await asyncio.gather(*(b.submit([r]) for r in rows))
        return model

    model = run(main())
    assert [len(x) for x in model.batches] == [4, 4, 2]
    assert all(len(x) * max(len(r) for r in x) <= 12 for x in model.batches)


def test_a_failing_batch_fails_only_its_requests_and_the_next_one_succeeds():
    async def main():
        model = RecordingModel(fail_on=13)
        b = Batcher(model, BatchingSpec(max_batch_size=8))
        with pytest.raises(ValueError):
            await b.submit([[13]])
        after = await b.submit([[7]])
        return after, b.alive()

    after, alive = run(main())
    assert after.tolist() == [[7.0]] and alive


def test_full_queue_fails_fast():
    async def main():
        import threading

        model = RecordingModel()
        model.gate = threading.Event()
        b = Batcher(model, BatchingSpec(max_batch_size=1, max_queue_rows=2))
        first = asyncio.ensure_future(b.submit([[1]]))  # occupies the backend
        await async_wait_until(model.entered.is_set, "the first batch to reach the model")
        second = asyncio.ensure_future(b.submit([[2], [3]]))  # fills the queue
        await async_wait_until(lambda: b.queued_rows == 2, "two queued rows")
        with pytest.raises(Overloaded, match="limit 2"):
            await b.submit([[4]])
        model.gate.set()
        return await first, await second

    first, second = run(main())
    assert first.tolist() == [[1.0]] and second.tolist() == [[2.0], [3.0]]


def test_cancelled_rows_never_reach_the_model():
    async def main():
        import threading

        model = RecordingModel()
        model.gate = threading.Event()
        b = Batcher(model, BatchingSpec(max_batch_size=1))
        first = asyncio.ensure_future(b.submit([[1]]))
        await async_wait_until(model.entered.is_set, "the first batch to reach the model")
        doomed = asyncio.ensure_future(b.submit([[99]]))
        await async_wait_until(lambda: b.queued_rows == 1, "the doomed row to be queued")
        doomed.cancel()
        await asyncio.sleep(0)
        model.gate.set()
        await first
        return model, await b.submit([[2]])

    model, last = run(main())
    assert [99] not in [r for batch in model.batches for r in batch]
    assert last.tolist() == [[2.0]]


def test_rows_of_different_adapters_share_a_batch_unless_split():
    async def main(split):
        model = RecordingModel()
        model.gate = __import__("threading").Event()
        b = Batcher(model, BatchingSpec(max_batch_size=8, split_by_adapter=split))
        first = asyncio.ensure_future(b.submit([[0]], None))  # occupies the model thread
        await async_wait_until(model.entered.is_set, "the first batch to reach the model")
        rest = [asyncio.ensure_future(b.submit([[i]], a)) for i, a in
                [(1, "x"), (2, None), (3, "y"), (4, "x")]]
        # all four wait while the first batch holds the model
        await async_wait_until(lambda: b.queued_rows == 4, "four queued rows")
        model.gate.set()
        await asyncio.gather(first, *rest)
        b.close()
        return model.batches, model.adapters

    batches, adapters = run(main(False))
    assert batches == [[[0]], [[1], [2], [3], [4]]] and adapters[1] == ["x", None, "y", "x"]
    batches, adapters = run(main(True))
    assert batches == [[[0]], [[1], [4]], [[2]], [[3]]]
    assert adapters[1:] == [["x", "x"], None, ["y"]]


def test_a_forward_pass_that_never_returns_makes_the_batcher_unhealthy():
    """A wedged backend (a pass stuck past ``stuck_batch_s``) fails the health check, so Serve
    replaces the replica; once the pass returns, the batcher is healthy again."""
    import threading

    async def go():
        model = RecordingModel()
        model.gate = threading.Event()  # the forward pass blocks until the gate opens
        b = Batcher(model, BatchingSpec(max_batch_size=4, stuck_batch_s=0.2))
        assert b.alive()
        task = asyncio.ensure_future(b.submit([[7]]))
        await async_wait_until(model.entered.is_set, "the forward pass to start")
        assert b.alive()  # busy, but not yet for long
        await asyncio.sleep(0.3)
        assert not b.alive()
        model.gate.set()
        assert (await task).tolist() == [[7.0]]
        assert b.alive()
        b.close()

    run(go())
