"""Prefix caching: the keys and values of prompt prefixes already computed, reused by later
prompts that begin with the same tokens through the same adapter.

Chat templates and system prompts make requests share their first tokens. A prompt whose first
blocks are cached copies their KV into its slot and prefills only the rest (always at least its
last token, whose logits give the first output token), so a burst of arrivals costs a fraction
of its prompt tokens. As vLLM's automatic prefix caching and SGLang's radix cache, with the
adapter in the key (an adapter changes K and V) and its load (``tag``): an adapter reloaded under
the same name never reuses the old one's KV.

Blocks of ``block`` tokens, chained: a block's key is (its parent block's id, the tag, its
tokens), compared exactly by the dict (no hash collision can hand out another prompt's KV). The
least recently used blocks are evicted beyond ``capacity`` bytes; a block whose parent was evicted
can no longer be reached and ages out. One thread (the engine's) uses it: no lock.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

BLOCK = 8  # tokens per block: fine enough that a short shared template prefix is reused


@dataclass(frozen=True)
class _Block:
    id: int
    kv: torch.Tensor  # [layers, 2, kv_heads, block, head_dim]


class PrefixCache:
    def __init__(self, capacity: int, block: int = BLOCK):
        self.capacity = capacity  # bytes
        self.block = block
        self.used = 0
        self._blocks: OrderedDict[tuple, _Block] = OrderedDict()
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._blocks)

    def _key(self, parent: int, tag: Hashable, prompt: Sequence[int], i: int) -> tuple:
        return parent, tag, tuple(prompt[i * self.block:(i + 1) * self.block])

    def match(self, tag: Hashable, prompt: Sequence[int]) -> tuple[int, torch.Tensor | None]:
        """The longest cached run of whole blocks at the start of ``prompt`` that leaves at least
        one token to compute: (its length in tokens, its KV ``[layers, 2, heads, length, dim]``)."""
        parent, found = 0, []
        for i in range((len(prompt) - 1) // self.block):
            key = self._key(parent, tag, prompt, i)
            b = self._blocks.get(key)
            if b is None:
                break
            self._blocks.move_to_end(key)
            found.append(b.kv)
            parent = b.id
        if not found:
            return 0, None
        return len(found) * self.block, found[0] if len(found) == 1 else torch.cat(found, dim=3)

    def store(self, tag: Hashable, prompt: Sequence[int], read: Callable[[int, int], torch.Tensor]) -> int:
        """Cache the whole blocks of ``prompt`` (all computed) that are not cached yet;
        ``read(start, n)`` gives the KV of positions ``start .. start+n-1``. Returns the number
        of blocks added."""
        parent, added = 0, 0
        for i in range(len(prompt) // self.block):
            key = self._key(parent, tag, prompt, i)
            b = self._blocks.get(key)
            if b is None:
                kv = read(i * self.block, self.block)
                if kv.nbytes > self.capacity:
                    return added
                b = self._blocks[key] = _Block(next(self._ids), kv)
                self.used += kv.nbytes
                added += 1
                while self.used > self.capacity:
                    _, old = self._blocks.popitem(last=False)
                    self.used -= old.kv.nbytes
                if key not in self._blocks:  # evicted at once: nothing after it can be reached
                    return added
            else:
                self._blocks.move_to_end(key)
            parent = b.id
        return added
