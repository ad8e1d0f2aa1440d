"""LoRA adapters as slots of stacked matrices: per-row adapters in one pass, loads as copies.

Every adapted ``nn.Linear`` of the served encoder is wrapped once in a ``SlotLinear`` that owns
two stacks, ``At: [slots, in, r]`` and ``Bt: [slots, r, out]`` (peft's ``A`` and ``B``
transposed, so both matmuls read contiguous memory; the adapter's scale folded into ``Bt``). An adapter occupies one slot index across all modules; slot 0 stays zero and serves
rows of the bare base. A forward pass takes one slot index per row and adds
``(x @ At[slot]) @ Bt[slot]`` to the base output: one gathered batched matmul per module,
whatever the number of distinct adapters in the batch (the Punica/S-LoRA "BGMV" shape; the
ONNX path will use the same stacks).

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
import threading
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from models.adapters import WEIGHTS_FILE, AdapterCheck, InvalidAdapter

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


def read_adapter(check: AdapterCheck, module_names: set[str]) -> tuple[dict, dict]:
    """Adapter tensors -> ({served module: (A, B)}, head tensors)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    head = {}
    for key, tensor in load_file(check.path / WEIGHTS_FILE).items():
        key = key.removeprefix("base_model.model.")
        if ".lora_A." in key or ".lora_B." in key:
            marker = ".lora_A." if ".lora_A." in key else ".lora_B."
            module = _served_name(key.split(marker)[0], module_names)
            pairs.setdefault(module, {})[marker[1:-1]] = tensor
        else:
            head[key.replace(".modules_to_save.default", "")] = tensor
    return {m: (p["lora_A"], p["lora_B"]) for m, p in pairs.items()}, head


def _served_name(module: str, module_names: set[str]) -> str:
    parts = module.split(".")
    for i in range(len(parts)):
        name = ".".join(parts[i:])
        if name in module_names:
            return name
    raise InvalidAdapter(f"target module {module!r} does not exist in the served model", param="lora_path")


def classifier_head(head_tensors: dict, labels: tuple[str, ...]) -> Head:
    weight = next((v for k, v in head_tensors.items() if k.endswith("classifier.weight")), None)
    bias = next((v for k, v in head_tensors.items() if k.endswith("classifier.bias")), None)
    if weight is None or bias is None or weight.dim() != 2:
        raise InvalidAdapter("classification adapter has no classifier head weights", param="lora_path")
    if not labels:
        labels = tuple(f"LABEL_{i}" for i in range(weight.shape[0]))
    if len(labels) != weight.shape[0]:
        raise InvalidAdapter(
            f"adapter names {len(labels)} labels but its head has {weight.shape[0]} outputs",
            param="lora_path",
        )
    # clone: a view would keep the whole memory-mapped adapter file alive
    return Head(weight.float().clone(), bias.float().clone(), labels)


class SlotBook:
    """Which adapter holds which slot (slot 0 is the bare base), with each adapter's task and
    head; shared by the torch stacks here and the ONNX ones (``models.onnx_backend.Slots``).
    Updates hold ``_lock``; readers (forward passes) only do single dict reads."""

    def __init__(self, slots: int):
        self._lock = threading.Lock()
        self._slots = max(slots, 1) + 1  # capacity, + the base slot
        self.slot_of: dict[str, int] = {}
        self._free: list[int] = []
        self.heads: dict = {}
        self.tasks: dict[str, str] = {}

    def _take_slot(self) -> int:
        """A free slot; the capacity doubles when every slot is taken."""
        if self._free:
            return self._free.pop()
        used = len(self.slot_of) + 1
        if used >= self._slots:
            self._slots *= 2
        return used

    def _check_new(self, name: str) -> None:
        if name in self.tasks:
            raise InvalidAdapter(f"adapter name {name!r} is already loaded here", param="lora_name")

    def _commit(self, name: str, slot: int, task: str, head) -> None:
        if head is not None:  # head first: a row may use the adapter once it has a slot
            self.heads[name] = head
        self.tasks[name] = task
        self.slot_of[name] = slot

    def remove(self, name: str) -> None:
        with self._lock:
            slot = self.slot_of.pop(name, None)
            if slot is None:
                return
            self.tasks.pop(name)
            self.heads.pop(name, None)
            self._release(slot)
            self._free.append(slot)

    def _release(self, slot: int) -> None:
        """Hook: the slot no longer serves an adapter."""


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

    @property
    def model(self) -> torch.nn.Module:
        return self.encoder

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
        pairs, head_tensors = read_adapter(check, set(self._modules))
        new_head = classifier_head(head_tensors, labels) if task == "classify" else None
        scale = check.alpha / (math.sqrt(check.rank) if check.use_rslora else check.rank)
        for module, (a, b) in pairs.items():
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise InvalidAdapter(f"module {module!r} has malformed LoRA matrices", param="lora_path")
        slot = self._take_slot()
        fresh = [m for m in pairs if m not in self._wrapped]
        for module, (a, b) in pairs.items():
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
        slots = [BASE_SLOT if a is None else self.slot_of[a] for a in adapters]
        if any(slots):
            self._batch.rows = torch.tensor(slots, dtype=torch.long)
            self._batch.single = slots[0] if all(s == slots[0] for s in slots) else None
        try:
            return self.encoder(input_ids=ids, attention_mask=mask)
        finally:
            self._batch.rows = None
            self._batch.single = None
