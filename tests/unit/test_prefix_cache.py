"""The prefix cache's bookkeeping: whole blocks matched exactly from the start of a prompt, per
tag, leaving the last token to compute; least recently used blocks evicted beyond the budget."""

import torch

from models.decoding.prefix_cache import PrefixCache


def kv_of(prompt):
    """A fake slot: position i holds the value prompt[i] (shape [layers=2, 2, heads=1, n, dim=3])."""
    def read(start, n):
        vals = torch.tensor(prompt[start:start + n], dtype=torch.float32)
        return vals[None, None, None, :, None].expand(2, 2, 1, n, 3).clone()
    return read


def test_match_returns_whole_blocks_and_leaves_the_last_token():
    c = PrefixCache(capacity=10**6, block=4)
    p = list(range(100, 112))  # 12 tokens: 3 blocks
    assert c.store("t", p, kv_of(p)) == 3
    n, kv = c.match("t", p)
    assert n == 8  # the third block would leave nothing to compute
    assert kv.shape == (2, 2, 1, 8, 3) and kv[0, 0, 0, :, 0].tolist() == p[:8]
    n, kv = c.match("t", p + [7])
    assert n == 12 and kv[1, 1, 0, :, 2].tolist() == p


def test_a_different_token_or_tag_ends_the_match():
    c = PrefixCache(capacity=10**6, block=4)
    p = list(range(12))
    c.store("a", p, kv_of(p))
    assert c.match("a", p[:5] + [99] + p[6:])[0] == 4  # second block differs
    assert c.match("b", p)[0] == 0  # another adapter's KV is never used
    assert c.match("a", [5] + p[1:])[0] == 0
    assert c.match("a", p[:4])[0] == 0  # a prompt of exactly one block: its last token is computed


def test_a_block_is_keyed_by_its_whole_prefix_not_its_own_tokens():
    c = PrefixCache(capacity=10**6, block=2)
    c.store("t", [1, 2, 3, 4, 9], kv_of([1, 2, 3, 4, 9]))
    assert c.match("t", [7, 7, 3, 4, 9])[0] == 0  # [3, 4] cached only after [1, 2]


def test_least_recently_used_blocks_go_beyond_the_budget():
    one = 2 * 2 * 1 * 2 * 3 * 4  # bytes of a block of 2 tokens in kv_of's shape
    c = PrefixCache(capacity=3 * one, block=2)
    a, b = [1, 2, 3, 4, 0], [5, 6, 7, 8, 0]
    c.store("t", a, kv_of(a))
    c.store("t", b[:3], kv_of(b))  # one block of b: a's two + this one fill the budget
    assert c.match("t", a)[0] == 4  # touch a: b's block is now the oldest
    c.store("t", [9, 9, 0], kv_of([9, 9, 0]))  # a new block: b's goes
    assert c.used <= c.capacity and len(c) == 3
    assert c.match("t", b)[0] == 0
    assert c.match("t", a)[0] == 4
    c.store("t", b, kv_of(b))  # b's two blocks: [9, 9], then a's first, go (a's second is now unreachable)
    assert len(c) == 3 and c.match("t", b)[0] == 4
    assert c.match("t", a)[0] == 0


def test_a_budget_smaller_than_a_block_stores_nothing():
    c = PrefixCache(capacity=10, block=2)
    assert c.store("t", [1, 2, 3], kv_of([1, 2, 3])) == 0
    assert len(c) == 0 and c.used == 0
