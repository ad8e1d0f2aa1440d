"""A KV cache of fixed slots, one per running sequence, that a Hugging Face causal LM writes into.

Each layer holds ``K, V: [slots, kv_heads, context + scratch, head_dim]``, allocated once with
``torch.zeros`` (the kernel maps zero pages lazily: slots never used cost no memory). A sequence
owns one slot; its cached positions are ``0 .. length-1`` of that slot. One forward pass works on
a contiguous run of slots ``[first, first + rows)``, each row bringing ``q_b`` new tokens from its
own length on (``rows``): a decode pass is every running sequence with one token; a prefill pass
is several prompts' next chunks at once. Rows are left-padded to the longest chunk, so the last
position of every row is a real token (``logits_to_keep=1`` gives each row's next-token logits).

``update`` (what the model's attention layers call) writes the new keys and values in place, each
at its row's own positions, and hands back ``K[first:first+rows, :, :width]``, a view, no copy,
where ``width`` is the longest row's length after the write. The 4D additive mask hides each
row's unused tail and keeps causality within a chunk. Padding queries write into the scratch
columns past the context (never inside a view) and attend to column 0 only, so everything they
compute stays finite and invisible. The scheduler keeps running sequences in slots
``0 .. running-1`` (``move`` refills a finished sequence's slot), so a decode step never gathers.

Why slots and not paged blocks: on CPU a gather of blocks per step copies the whole cache of the
batch (for 32 sequences of 300 tokens on the default base, about 80 MB per step by arithmetic:
32 x 300 positions x 4 layers x 2 x 256 floats; not benchmarked), while a contiguous slot view copies nothing. Memory is reserved per slot
for the full context, which for models of this size is a few MB per slot.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class SlotKVCache(Cache):
    def __init__(self, slots: int, context: int, scratch: int):
        super().__init__(layers=[])
        self.slots = slots
        self.context = context
        self.scratch = scratch  # columns past the context where padding queries write
        self.keys: list[torch.Tensor] = []  # per layer [slots, kv_heads, context + scratch, head_dim]
        self.values: list[torch.Tensor] = []
        self._first = 0
        self._rows = 0
        self._write: torch.Tensor | None = None  # [rows, q] column each new token is written to
        self._width = 0

    # -- the scheduler's side ------------------------------------------------------------------
    def rows(self, first: int, starts: list[int], qs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepare a pass over slots ``first ..``: row ``b`` holds ``starts[b]`` tokens and brings
        ``qs[b]`` new ones. Returns the additive mask ``[rows, 1, q, width]`` and the position
        ids ``[rows, q]`` (``q = max(qs)``, rows left-padded)."""
        n, q = len(starts), max(qs)
        if q > self.scratch:
            raise ValueError(f"a chunk of {q} tokens is longer than the scratch area ({self.scratch})")
        start = torch.tensor(starts, dtype=torch.long)[:, None]  # [n, 1]
        pad_to = q - torch.tensor(qs, dtype=torch.long)[:, None]  # [n, 1] left padding of each row
        j = torch.arange(q)[None, :]  # [1, q]
        pad = j < pad_to  # [n, q]
        pos = start + j - pad_to  # real tokens' positions (negative on padding)
        self._write = torch.where(pad, self.context + j, pos)
        self._first, self._rows = first, n
        self._width = max(s + x for s, x in zip(starts, qs))
        k = torch.arange(self._width)[None, None, :]  # [1, 1, width]
        allowed = (~pad[:, :, None] & (k <= pos[:, :, None])) | (pad[:, :, None] & (k == 0))
        mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        return mask[:, None], torch.where(pad, 0, pos)

    def move(self, moves: list[tuple[int, int, int]]) -> None:
        """Copy slot contents: each ``(src, dst, length)`` moves the first ``length`` positions;
        sources are read before any destination is written (moves may form cycles)."""
        for k, v in zip(self.keys, self.values):
            held = [(dst, k[src, :, :n].clone(), v[src, :, :n].clone()) for src, dst, n in moves]
            for dst, kk, vv in held:
                n = kk.shape[1]
                k[dst, :, :n] = kk
                v[dst, :, :n] = vv

    def read(self, slot: int, start: int, n: int) -> torch.Tensor:
        """A copy of positions ``start .. start+n-1`` of ``slot``: ``[layers, 2, kv_heads, n, dim]``."""
        return torch.stack([torch.stack((k[slot, :, start:start + n], v[slot, :, start:start + n]))
                            for k, v in zip(self.keys, self.values)])

    def write(self, slot: int, start: int, kv: torch.Tensor) -> None:
        """Put ``kv`` (as ``read`` gives it) at positions ``start ..`` of ``slot``."""
        n = kv.shape[3]
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            k[slot, :, start:start + n] = kv[layer, 0]
            v[slot, :, start:start + n] = kv[layer, 1]

    # -- the model's side ------------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if layer_idx == len(self.keys):  # first pass: one allocation per layer
            shape = (self.slots, key_states.shape[1], self.context + self.scratch, key_states.shape[-1])
            # zeros, not empty: masked positions still enter the matmuls (weight 0), and a NaN
            # left in reused memory would turn 0 x NaN into NaN for the whole row
            self.keys.append(torch.zeros(shape, dtype=key_states.dtype))
            self.values.append(torch.zeros(shape, dtype=value_states.dtype))
        K, V = self.keys[layer_idx], self.values[layer_idx]
        first, last = self._first, self._first + self._rows
        rows = torch.arange(self._rows)[:, None]  # [n, 1] against write [n, q]
        K[first:last][rows, :, self._write] = key_states.transpose(1, 2)  # [n, q, heads, dim]
        V[first:last][rows, :, self._write] = value_states.transpose(1, 2)
        return K[first:last, :, : self._width], V[first:last, :, : self._width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always given explicitly

    def get_mask_sizes(self, cache_position: torch.Tensor, layer_idx: int) -> tuple[int, int]:
        return self._width, 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.context

    @property
    def is_compileable(self) -> bool:
        return False

    def __len__(self) -> int:
        return len(self.keys)
