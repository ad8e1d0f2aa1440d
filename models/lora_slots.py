"""LoRA adapters as slots of stacked matrices: per-row adapters in one pass, loads as copies.

Every adapted ``nn.Linear`` of the served encoder is wrapped once in a ``SlotLinear`` that owns
two stacks, ``At: [slots, in, r]`` and ``Bt: [slots, r, out]`` (peft's ``A`` and ``B``
transposed, so both matmuls read contiguous memory; the adapter's scale folded into ``Bt``). An adapter occupies one slot index across all modules; slot 0 stays zero and serves
rows of the bare base. A forward pass takes one slot index per row and adds
``(x @ At[slot]) @ Bt[slot]`` to the base output: one gathered batched matmul per module,
whatever the number of distinct adapters in the batch (the Punica/S-LoRA "BGMV" shape; the
ONNX backend keeps the same stacks as numpy arrays and feeds them to its graph).

Why not peft's ``add_adapter`` + ``adapter_names``: peft creates new modules per adapter on
every load (tens of ms) and splits each layer's work per distinct adapter in a batch.
Here a load is a safetensors read and a copy into a free slot (on any thread, while batches
run), and an eviction frees the slot for the next load; memory grows with the slots actually
written (at most the LRU capacity plus the adapters of in-flight batches) and is reused. Smaller ranks are zero-padded to the module's largest rank, which leaves
results exact (the padded products are exact zeros). Outputs equal peft's to float rounding
(``tests/unit/test_torch_adapters.py`` holds them to 1e-5).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from models.adapters.config import WEIGHTS_FILE
from models.adapters.validation import AdapterCheck
from models.adapters.weights import classifier_head, read_lora
from models.errors import InvalidAdapter
from models.slot_book import SlotBook

BASE_SLOT = 0


@dataclass
class Head:
    """A classification head over the pooled output: ``probs = softmax(W @ pooled + b)``."""

    weight: torch.Tensor  # [labels, hidden]
    bias: torch.Tensor  # [labels]
    labels: tuple[str, ...]


class _Batch:
    """Which slot each row of the current forward pass uses (set around each pass)."""

    rows: torch.Tensor | None = None  # [batch] slot indices
    single: int | None = None  # every row uses this one slot


class SlotLinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, batch: _Batch):
        super().__init__()
        self.base = base
        self.batch = batch
        # (At [slots, in, r], Bt [slots, r, out]) as ONE attribute: a forward pass reads it once,
        # so a concurrent regrowth can never hand it an At and a Bt of different ranks.
        self.stacks: tuple[torch.Tensor, torch.Tensor] | None = None
        self.live: set[int] = set()  # slots whose adapter targets this module

    def ensure(self, slots: int, rank: int) -> None:
        """Grow the stacks to at least ``slots`` x ``rank`` (existing content kept).

        ``torch.empty``: pages of slots never written are never touched, so capacity costs
        address space, not memory; slot 0 and the rank padding of written slots are zeroed.
        """
        out_f, in_f = self.base.weight.shape
        have_slots, have_rank = (0, 0) if self.stacks is None else (
            self.stacks[0].shape[0], self.stacks[0].shape[2])
        if have_slots >= slots and have_rank >= rank:
            return
        slots, rank = max(slots, have_slots), max(rank, have_rank)
        At = torch.empty(slots, in_f, rank, dtype=self.base.weight.dtype)
        Bt = torch.empty(slots, rank, out_f, dtype=self.base.weight.dtype)
        At[0].zero_()
        Bt[0].zero_()
        if self.stacks is not None:
            old_A, old_B = self.stacks
            At[:have_slots, :, :have_rank] = old_A
            At[:have_slots, :, have_rank:] = 0
            Bt[:have_slots, :have_rank] = old_B
            Bt[:have_slots, have_rank:] = 0
        self.stacks = (At, Bt)

    def put(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Write one adapter's ``a: [r, in]`` and scaled ``b: [out, r]`` (None: not targeted)."""
        if self.stacks is None:
            return
        At, Bt = self.stacks
        At[slot].zero_()
        Bt[slot].zero_()
        if a is None:
            self.live.discard(slot)
            return
        r = a.shape[0]
        At[slot, :, :r] = a.transpose(0, 1)
        Bt[slot, :r] = b.transpose(0, 1)
        self.live.add(slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.batch
        stacks = self.stacks
        if batch.rows is None or stacks is None or not self.live:
            return y
        At, Bt = stacks
        if batch.single is not None:
            if batch.single not in self.live:
                return y
            s = batch.single  # y += (x @ At) @ Bt, the add fused into the second matmul
            y.view(-1, y.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]) @ At[s], Bt[s])
            return y
        flat = x.dim() == 2  # e.g. the pooler: [batch, in]
        h = x.unsqueeze(1) if flat else x  # [batch, seq, in]
        a = At.index_select(0, batch.rows)  # [batch, in, r]
        b = Bt.index_select(0, batch.rows)  # [batch, r, out]
        y3 = y.unsqueeze(1) if flat else y  # [batch, seq, out], a view of y
        y3.baddbmm_(torch.bmm(h, a), b)
        return y


class SlotAdapters:
    """The ``Backend`` adapter methods of a torch backend whose adapters live in ``self.lora``
    (a ``LoraEncoder``); loads may run beside forward passes (see ``LoraEncoder``)."""

    concurrent_adapter_updates = True
    lora: LoraEncoder

    def add_adapter(self, name: str, check: AdapterCheck, task: str, labels: tuple[str, ...] = ()) -> None:
        self.lora.add(name, check, task, labels)

    def remove_adapter(self, name: str) -> None:
        self.lora.remove(name)

    def loaded_adapters(self) -> list[str]:
        return list(self.lora.tasks)


class LoraEncoder(SlotBook):
    """The served encoder plus its adapters in slots.

    Threads: ``add``/``remove`` may run on another thread while ``forward`` runs (they are
    serialized among themselves by a lock), provided ``remove`` is only called for an adapter
    no in-flight batch uses -- the ModelServer's LRU guarantees that. A new adapter takes a slot
    no running batch reads, stacks are swapped whole, and dict updates are atomic under the GIL,
    so a load never waits for a forward pass.
    """

    def __init__(self, encoder: torch.nn.Module, slots: int = 16):
        super().__init__(slots)
        self.encoder = encoder
        self._modules = {name: m for name, m in encoder.named_modules()}
        self._wrapped: dict[str, SlotLinear] = {}
        self._batch = _Batch()

    def _wrap(self, name: str) -> SlotLinear:
        mod = self._wrapped.get(name)
        if mod is None:
            base = self._modules[name]
            if not isinstance(base, torch.nn.Linear):
                raise InvalidAdapter(f"target module {name!r} is not a linear layer", param="lora_path")
            parent_name, _, child = name.rpartition(".")
            mod = SlotLinear(base, self._batch)
            setattr(self._modules[parent_name] if parent_name else self.encoder, child, mod)
            self._wrapped[name] = mod
        return mod

    def add(self, name: str, check: AdapterCheck, task: str, labels: tuple[str, ...] = ()) -> None:
        with self._lock:
            self._add(name, check, task, labels)

    def _add(self, name: str, check: AdapterCheck, task: str, labels: tuple[str, ...]) -> None:
        self._check_new(name)
        weights = read_lora(check.path / WEIGHTS_FILE, set(self._modules))
        pairs = {m: (torch.from_numpy(a), torch.from_numpy(b)) for m, (a, b) in weights.pairs.items()}
        new_head = None
        if task == "classify":
            w, b, names = classifier_head(weights.head, labels)
            new_head = Head(torch.from_numpy(w), torch.from_numpy(b), names)
        scale = check.alpha / (math.sqrt(check.rank) if check.use_rslora else check.rank)
        slot = self._take_slot()
        fresh = [m for m in pairs if m not in self._wrapped]
        for module, (a, _) in pairs.items():
            self._wrap(module).ensure(self._slots, a.shape[0])
        for module in fresh:  # a newly adapted module: the adapters already loaded are zero there
            for other in self.slot_of.values():
                self._wrapped[module].put(other, None, None)
        for module, wrapped in self._wrapped.items():
            wrapped.ensure(self._slots, 1)
            a, b = pairs.get(module, (None, None))
            wrapped.put(slot, a.float() if a is not None else None, b.float() * scale if b is not None else None)
        self._commit(name, slot, task, new_head)

    def _release(self, slot: int) -> None:
        for wrapped in self._wrapped.values():
            wrapped.live.discard(slot)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, adapters: list[str | None]):
        """One pass; returns the encoder output (``last_hidden_state``, ``pooler_output``)."""
        with self.rows(adapters):
            return self.encoder(input_ids=ids, attention_mask=mask)

    @contextmanager
    def rows(self, adapters: list[str | None]):
        """Within this block, row ``i`` of a forward pass of the wrapped model uses adapter
        ``adapters[i]`` (None: the bare base). Any model: the generative engine uses it too."""
        slots = [BASE_SLOT if a is None else self.slot_of[a] for a in adapters]
        if any(slots):
            self._batch.rows = torch.tensor(slots, dtype=torch.long)
            self._batch.single = slots[0] if all(s == slots[0] for s in slots) else None
        try:
            yield
        finally:
            self._batch.rows = None
            self._batch.single = None
