"""A KV cache of fixed slots, one per running sequence, that a Hugging Face causal LM writes into.

Each layer holds ``K, V: [slots, kv_heads, context, head_dim]``, allocated once with
``torch.zeros`` (the kernel maps zero pages lazily: slots never used cost no memory). A sequence owns one slot; its
cached positions are ``0 .. length-1`` of that slot. A forward pass works on a contiguous run of
slots ``[first, first + rows)``:

- decode: ``rows`` sequences, one new token each, written at each row's own position;
- prefill: one sequence, a chunk of ``q`` tokens written from its current length.

``update`` (what the model's attention layers call) writes the new keys and values in place and
hands back ``K[first:first+rows, :, :width]``, a view, no copy, where ``width`` is the longest
row's length after the write; the 4D attention mask (``attention_mask``) hides each row's unused
tail and keeps causality within a prefill chunk. The scheduler keeps running sequences in slots
``0 .. running-1`` (a finished sequence's slot is refilled by moving the last one down, one
sequence's cache copied), so a decode step never gathers.

Why slots and not paged blocks: on CPU a gather of blocks per step copies the whole cache of the
batch (for 32 sequences of 300 tokens on the default base, about 80 MB per step, more than the
model's own arithmetic), while a contiguous slot view copies nothing. Memory is reserved per slot
for the full context, which for models of this size is a few MB per slot.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class SlotKVCache(Cache):
    def __init__(self, slots: int, context: int):
        super().__init__(layers=[])
        self.slots = slots
        self.context = context
        self.keys: list[torch.Tensor] = []  # per layer [slots, kv_heads, context, head_dim]
        self.values: list[torch.Tensor] = []
        self._first = 0
        self._rows = 0
        self._positions: torch.Tensor | None = None  # decode: [rows] write position per row
        self._start = 0  # prefill: write position of the chunk
        self._width = 0

    # -- the scheduler's side ------------------------------------------------------------------
    def decode(self, lengths: list[int]) -> torch.Tensor:
        """Prepare a decode pass over slots ``0 .. len(lengths)-1`` whose rows hold ``lengths``
        tokens; returns the 4D additive mask ``[rows, 1, 1, width]``."""
        self._first, self._rows, self._start = 0, len(lengths), 0
        self._positions = torch.tensor(lengths, dtype=torch.long)
        self._width = max(lengths) + 1
        cols = torch.arange(self._width)
        allowed = cols[None, :] <= self._positions[:, None]  # [rows, width]
        return _additive(allowed)[:, None, None, :]

    def prefill(self, slot: int, start: int, q: int) -> torch.Tensor:
        """Prepare a prefill pass of ``q`` tokens of the sequence in ``slot`` that holds
        ``start`` tokens already; returns the mask ``[1, 1, q, start + q]``."""
        self._first, self._rows, self._start = slot, 1, start
        self._positions = None
        self._width = start + q
        rows = torch.arange(start, start + q)[:, None]
        allowed = torch.arange(self._width)[None, :] <= rows  # [q, width]
        return _additive(allowed)[None, None]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` cached positions of slot ``src`` into slot ``dst``."""
        for k, v in zip(self.keys, self.values):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def bytes_per_slot(self) -> int:
        return sum(k[0].numel() * k.element_size() * 2 for k in self.keys)

    # -- the model's side ------------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if layer_idx == len(self.keys):  # first pass: one allocation per layer
            shape = (self.slots, key_states.shape[1], self.context, key_states.shape[-1])
            # zeros, not empty: masked positions still enter the matmuls (weight 0), and a NaN
            # left in reused memory would turn 0 x NaN into NaN for the whole row
            self.keys.append(torch.zeros(shape, dtype=key_states.dtype))
            self.values.append(torch.zeros(shape, dtype=value_states.dtype))
        K, V = self.keys[layer_idx], self.values[layer_idx]
        first, last = self._first, self._first + self._rows
        if self._positions is not None:  # decode: row b writes its token at positions[b]
            rows = torch.arange(self._rows)
            K[first:last][rows, :, self._positions] = key_states[:, :, 0]
            V[first:last][rows, :, self._positions] = value_states[:, :, 0]
        else:
            end = self._start + key_states.shape[2]
            K[first, :, self._start:end] = key_states[0]
            V[first, :, self._start:end] = value_states[0]
        return K[first:last, :, : self._width], V[first:last, :, : self._width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._start

    def get_mask_sizes(self, cache_position: torch.Tensor, layer_idx: int) -> tuple[int, int]:
        return self._width, 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.context

    @property
    def is_compileable(self) -> bool:
        return False

    def __len__(self) -> int:
        return len(self.keys)


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    """Boolean "may attend" to an additive float mask (0 where allowed, the dtype's minimum
    elsewhere), which both the SDPA and the eager attention of transformers accept."""
    mask = torch.zeros(allowed.shape, dtype=torch.float32)
    return mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
